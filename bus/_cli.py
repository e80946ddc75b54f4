"""The ``bus`` command: run workers, send tasks, inspect queues, handle dead letters.

The CLI is an application, so unlike the library it configures structlog (console
output on a terminal, JSON lines otherwise).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import difflib
import functools
import importlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import structlog
import trio

import actors
from actors._supervision import RestartLimiter
from bus._broker import Broker, plain_error
from bus._errors import BusError, ResultTimeout
from bus._message import TaskResult, TaskStatus
from bus._options import is_queue_name
from bus._workflow_cli import add_workflows_parser
from bus._workflow_cli import parse_id as parse_workflow_id
from bus._workflow_cli import show as show_workflow

if TYPE_CHECKING:
    from bus._worker import Worker

__all__ = ["main"]

#: Two SIGTERMs closer than this are one stop request: systemd's control-group kill
#: and the supervisor's forward of it reach a child together. (SIGINT, from a person
#: at a terminal, always counts: Ctrl-C twice cancels.)
SIGNAL_DEBOUNCE = 1.0
#: After the shutdown timeout, how long the supervisor waits before SIGKILL.
KILL_GRACE = 10.0
#: After a second stop request, how long a worker may take to cancel what runs and hand
#: it back before its process ends regardless (``forced_exit_code``).
FORCE_GRACE = 1.0


class CLIError(Exception):
    """A problem to report on one line, with exit code 2 (``code`` may say otherwise)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"bus: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _version() -> str:
    from bus import __version__

    return __version__


def load_broker(spec: str) -> Broker:
    """Import ``MODULE:ATTRIBUTE`` and return the broker it names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"expected MODULE:BROKER (e.g. myapp.tasks:broker), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise CLIError(f"no module named {module_name!r} (looked in {os.getcwd()})") from None
        raise CLIError(f"importing {module_name!r} failed: {exc}") from None
    except ImportError as exc:
        raise CLIError(f"importing {module_name!r} failed: {exc}") from None
    except Exception as exc:
        raise CLIError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CLIError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, Broker):
        raise CLIError(f"{spec} is a {type(obj).__name__}, not a bus broker")
    return obj


def configure_logging(fmt: str | None, level: str) -> None:
    """Console on a terminal, JSON lines otherwise (or as ``fmt`` says). Each event is
    one write of one line, so lines of several processes never interleave."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise CLIError(f"unknown log level {level!r} (debug, info, warning, error)")
    tty = sys.stderr.isatty()
    if fmt is None:
        fmt = "console" if tty else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=tty)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _in_process_only(broker: Broker, command: str) -> None:
    if not broker.distributed:
        raise CLIError(
            f"`bus {command}` does not apply to {type(broker).__name__}: its queue and worker "
            "live inside one Python process, so no other process can reach them. Use a "
            "broker shared between processes (bus.redis.RedisBroker), or run tasks from "
            "your program inside `async with broker`."
        )


def _where(broker: Broker) -> str:
    return " ".join(f"{k}={v}" for k, v in broker.describe().items())


# ---------------------------------------------------------------------- worker


async def _stop_requests(
    signals: AsyncIterator[int], window: float = SIGNAL_DEBOUNCE
) -> AsyncIterator[int]:
    """The distinct stop requests among the signals: a SIGTERM within ``window``
    seconds of the previous request is the same request."""
    last = -math.inf
    async for signum in signals:
        now = trio.current_time()
        if signum != signal.SIGTERM or now - last >= window:
            last = now
            yield signum


async def run_worker(
    broker: Broker,
    concurrency: int | None,
    shutdown_timeout: float,
    queues: Sequence[str] = (),
    scheduler: bool = True,
) -> int:
    """Run a worker until SIGINT/SIGTERM and return the exit status.

    The first stop request drains: intake stops, running tasks get
    ``shutdown_timeout`` seconds, what still runs then is interrupted and handed back
    (a sync task is abandoned in its thread), the last acks are written, and the
    status is 0. A second request ends the process at once with ``128 + signal``
    (:func:`forced_exit_code`). A request before the worker has started ends the
    start (0). ``queues``: the queues it consumes (none: the broker's default queue)."""
    log = structlog.get_logger("bus.cli")
    stop = trio.Event()  # the first stop request
    ready = trio.Event()  # the worker started, or its start ended
    serving = trio.CancelScope()  # the worker, while it starts
    watching = trio.CancelScope()  # the stop requests, until the drain is done
    forced = 0
    timer: threading.Timer | None = None
    worker: Worker | None = None

    class Started:
        def started(self, value: Worker | None = None) -> None:
            nonlocal worker
            worker = value
            ready.set()

    async def serve() -> None:
        try:
            with serving:
                await broker.run_worker(
                    concurrency, queues=queues or None, scheduler=scheduler, task_status=Started()
                )
        finally:
            ready.set()

    async def watch(requests: AsyncIterator[int]) -> None:
        nonlocal forced, timer
        with watching:
            async for signum in requests:
                name = signal.Signals(signum).name
                if not stop.is_set():
                    stop.set()
                    if worker is None:
                        serving.cancel()  # still starting: nothing to drain
                    else:
                        log.info("worker.draining", signal=name, timeout=shutdown_timeout)
                    continue
                forced = forced_exit_code(signum)
                log.warning("worker.cancelling", signal=name, exit_code=forced)
                # Running tasks are cancelled (sync ones abandoned in their threads) and
                # handed back; should that not be done within FORCE_GRACE, the process
                # ends anyway.
                timer = _exit_later(forced, FORCE_GRACE)
                if worker is not None:
                    worker.stop()  # then run_worker leaves `async with broker` cleanly
                else:
                    serving.cancel()
                return

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as receiver:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, _stop_requests(receiver))
            nursery.start_soon(serve)
            await ready.wait()
            if worker is not None and not stop.is_set():
                where = _where(broker)
                print(
                    f"bus worker: {type(broker).__name__} {where + ' ' if where else ''}"
                    f"pid={os.getpid()} concurrency={worker.concurrency} "
                    f"tasks={', '.join(sorted(broker.tasks))}"
                    + (f" queues={','.join(queues)}" if queues else ""),
                    file=sys.stderr,
                    flush=True,
                )
            if worker is not None:
                await stop.wait()
                interrupted = await worker.drain(shutdown_timeout)
                if interrupted:
                    log.warning("worker.interrupted", tasks=interrupted)
                worker.stop()
            watching.cancel()
            # run_worker now leaves `async with broker` cleanly: its last acks are
            # written and what is unfinished is handed back before the connection closes.
    if timer is not None:
        timer.cancel()  # ended in time
    log.info("worker.exited", **({"exit_code": forced} if forced else {}))
    return forced


def forced_exit_code(signum: int) -> int:
    """The exit status of a worker that a second stop request ended: 128 + the signal's
    number (130 after Ctrl-C, 143 after SIGTERM), as a shell reports a signal."""
    return 128 + signum


def _exit_later(code: int, delay: float) -> threading.Timer:
    """End the process with ``code`` in ``delay`` seconds, whatever it is doing then,
    unless the timer is cancelled first (a daemon thread: it never holds the process)."""

    def end() -> None:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(delay, end)
    timer.daemon = True
    timer.start()
    return timer


def _child_args(argv: Sequence[str]) -> list[str]:
    """The worker command without ``--processes N`` / ``--processes=N``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--processes":
            skip = True
            continue
        if arg.startswith("--processes="):
            continue
        out.append(arg)
    return out


#: How long the supervisor waits before restarting a crashed worker process: the
#: actors' backoff (0.5 s doubling to 10 s, with jitter).
PROCESS_BACKOFF = actors.Backoff(initial=0.5, factor=2.0, cap=10.0, jitter=0.5)


def supervise(
    argv: Sequence[str],
    processes: int,
    shutdown_timeout: float,
    kill_grace: float = KILL_GRACE,
    max_restarts: int = 5,
    window: float = 60.0,
) -> int:
    """Run ``processes`` copies of this worker command, each in its own session (so a
    terminal's Ctrl-C or a signal to the supervisor's process group reaches a child
    only through the supervisor, once), relay their log lines whole, forward stop
    requests, restart a crashed one with backoff, and SIGKILL what is still running
    ``shutdown_timeout + kill_grace`` seconds after the first stop (``FORCE_GRACE`` + 1
    after a second one). Exits 1 when children keep crashing or one did not exit 0 on
    a stop, and ``forced_exit_code`` after a second stop request."""
    return trio.run(
        _supervise,
        _child_args(argv),
        processes,
        shutdown_timeout + kill_grace,
        max_restarts,
        window,
    )


async def _relay(stream: trio.abc.ReceiveStream) -> None:
    """Copy a child's stderr to ours, one whole line per write."""
    out = sys.stderr.buffer
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            out.write(line + b"\n")
            out.flush()
    if buffer:
        out.write(buffer + b"\n")
        out.flush()


async def _supervise(
    argv: list[str], processes: int, kill_after: float, max_restarts: int, window: float
) -> int:
    log = structlog.get_logger("bus.cli")
    cmd = [sys.executable, "-m", "bus", *argv]
    procs: dict[int, trio.Process] = {}
    limiter = RestartLimiter(max_restarts, window)
    stopping = trio.Event()
    failed = False
    forced = 0  # the exit status after a second stop request
    exit_codes: list[int] = []

    async def keep(slot: int) -> None:
        nonlocal failed
        restarts = 0
        while not stopping.is_set():
            proc = await trio.lowlevel.open_process(
                cmd, stderr=subprocess.PIPE, start_new_session=True, env=_slot_env(slot, restarts)
            )
            restarts += 1
            procs[slot] = proc
            log.info("supervisor.started", slot=slot, pid=proc.pid)
            assert proc.stderr is not None
            async with trio.open_nursery() as relay:
                relay.start_soon(_relay, proc.stderr)
                code = await proc.wait()
            del procs[slot]
            if stopping.is_set():
                exit_codes.append(code)
                return
            # The actors' own supervision rules: a restart limit within a window (for
            # all the slots together) and the same backoff.
            allowed = limiter.allow(trio.current_time())
            log.warning(
                "supervisor.crashed",
                slot=slot,
                pid=proc.pid,
                code=code,
                recent_crashes=limiter.recent + (0 if allowed else 1),
            )
            if not allowed:
                log.error(
                    "supervisor.giving_up",
                    reason=f"worker processes crashed more than {max_restarts} times "
                    f"within {window:g} s",
                    last_exit_code=code,
                )
                failed = True
                stop_all(signal.SIGTERM)
                return
            await trio.sleep(PROCESS_BACKOFF.delay(limiter.recent))

    def stop_all(signum: int) -> None:
        stopping.set()
        for proc in list(procs.values()):
            if proc.returncode is None:
                proc.send_signal(signum)

    async def escalate(delay: float) -> None:
        await trio.sleep(delay)
        for proc in list(procs.values()):
            if proc.returncode is None:
                log.error("supervisor.killing", pid=proc.pid)
                proc.kill()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as receiver:
        async with trio.open_nursery() as outer:

            async def forward() -> None:
                nonlocal forced
                first = True
                async for signum in _stop_requests(receiver):
                    log.info("supervisor.stopping", signal=signal.Signals(signum).name)
                    stop_all(signum)  # a second request is forwarded too: children cancel
                    if first:
                        first = False
                        outer.start_soon(escalate, kill_after)
                    elif not forced:
                        # Children end at once; one that does not is killed soon.
                        forced = forced_exit_code(signum)
                        outer.start_soon(escalate, FORCE_GRACE + 1.0)

            outer.start_soon(forward)
            async with trio.open_nursery() as slots:
                for slot in range(processes):
                    slots.start_soon(keep, slot)
            outer.cancel_scope.cancel()  # every slot has ended
    if forced:
        return forced
    if failed or any(code != 0 for code in exit_codes):
        return 1
    return 0


def _slot_env(slot: int, restarts: int) -> dict[str, str]:
    """A child's environment: which slot of ``--processes`` it runs (``--metrics-port``
    serves PORT + slot) and how often that slot was restarted before."""
    return {**os.environ, "BUS_WORKER_SLOT": str(slot), "BUS_WORKER_RESTARTS": str(restarts)}


# ------------------------------------------------------------- worker metrics


def _add_metrics_option(w: argparse.ArgumentParser) -> None:
    w.add_argument(
        "--metrics-port",
        metavar="[HOST:]PORT",
        default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (host: 127.0.0.1); "
        "with --processes N, child i serves PORT+i",
    )


def _metrics_address(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise CLIError(f"--metrics-port takes PORT or HOST:PORT, not {text!r}") from None
    slot = os.environ.get("BUS_WORKER_SLOT", "0")
    port += int(slot) if slot.isdigit() else 0
    if not 0 <= port < 65536:
        raise CLIError(f"--metrics-port {text!r}: port {port} is out of range")
    return host, port


def _run_worker_with_metrics(broker: Broker, worker_args: tuple[Any, ...], address: str) -> int:
    """``bus worker --metrics-port``: the worker, and beside it a tiny HTTP server of the
    broker's PrometheusMiddleware registry (one is attached when the broker has none)."""
    try:
        from bus.metrics import PrometheusMiddleware, _registry_of, serve_metrics
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    host, port = _metrics_address(address)
    registry = _registry_of(broker.middlewares)
    if registry is None:
        mw = PrometheusMiddleware()
        broker.with_middlewares(mw)
        registry = mw.registry

    async def main() -> int:
        listeners = await trio.open_tcp_listeners(port, host=host)  # OSError: exit 1
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(
                functools.partial(serve_metrics, registry, listeners=listeners)
            )
            shown = f"[{host}]" if ":" in host else host
            print(f"bus worker: metrics at http://{shown}:{bound}/metrics", file=sys.stderr)
            code = await run_worker(broker, *worker_args)
            nursery.cancel_scope.cancel()
        return code

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        raise plain_error(group) from None


# ------------------------------------------------------------------------ send


def _result_json(result: TaskResult[Any]) -> str:
    err = result.error
    return json.dumps(
        {
            "task_id": str(result.task_id),
            "status": result.status.value,
            "return_value": result.return_value,
            "error": None if err is None else {"type": err.type_name, "message": err.message},
            "execution_time": result.execution_time,
        },
        default=repr,
    )


def _unknown_task(broker: Broker, name: str) -> CLIError:
    known = sorted(broker.tasks)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return CLIError(f"unknown task {name!r}{hint}; registered tasks: {', '.join(known) or 'none'}")


def _check_call(broker: Broker, task_name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Refuse arguments that do not fit the task's signature, naming the parameter."""
    task = broker.find_task(task_name)
    assert task is not None
    try:
        task.check_call(tuple(args), kwargs)
    except TypeError as exc:
        raise CLIError(f"wrong arguments for {exc}") from None


async def send(
    broker: Broker,
    task_name: str,
    args: list[Any],
    kwargs: dict[str, Any],
    wait: bool,
    timeout: float | None,
) -> int:
    task = broker.find_task(task_name)
    if task is None:
        raise _unknown_task(broker, task_name)
    _check_call(broker, task_name, args, kwargs)
    # --timeout bounds everything: reaching the broker, sending, and the wait.
    with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
        async with broker:
            handle = await task.kiq(*args, **kwargs)
            if not wait:
                print(handle.task_id)
                return 0
            try:
                result = await handle.wait_result()
            except ResultTimeout:  # pragma: no cover - the scope's deadline comes first
                raise CLIError(f"no result for {handle.task_id} within {timeout}s", 1) from None
    if scope.cancelled_caught:
        raise CLIError(f"no result within {timeout}s (--timeout)", 1)
    print(_result_json(result))
    return 0 if result.status is TaskStatus.SUCCESS else 1


def _json_arg(text: str, what: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"--{what} is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, kind):
        want = "a JSON array" if kind is list else "a JSON object"
        raise CLIError(f"--{what} must be {want}, got {type(value).__name__}")
    return value


# --------------------------------------------------------------- inspect, dead


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "-"
    return str(value)


def _print_info(info: dict[str, Any]) -> None:
    """``inspect``'s numbers as text: scalars in a column, mappings and lists of
    records as indented tables (no Python reprs)."""
    for key, value in info.items():
        if key == "queues" and isinstance(value, dict):
            print("queues:")
            for name, numbers in value.items():
                shown = " ".join(
                    f"{k}={v}" for k, v in numbers.items() if not isinstance(v, dict | list)
                )
                levels = numbers.get("by_priority") or {}
                if levels:
                    shown += " by_priority=" + ",".join(f"{lv}:{n}" for lv, n in levels.items())
                print(f"  {name:<24} {shown}")
        elif isinstance(value, dict):
            print(f"{key}:")
            if not value:
                print("  (none)")
            for k, v in value.items():
                print(f"  {k:<40} {_cell(v)}")
        elif isinstance(value, list):
            print(f"{key}:")
            if not value:
                print("  (none)")
            for item in value:
                if isinstance(item, dict):
                    print("  " + "  ".join(f"{k}={_cell(v)}" for k, v in item.items()))
                else:
                    print(f"  {_cell(item)}")
        else:
            print(f"{key:<24} {_cell(value)}")


async def inspect(broker: Broker, as_json: bool) -> int:
    async with broker:
        info = dict(await broker.inspect())
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    _print_info(info)
    return 0


def _when(t: float | None) -> str:
    if t is None or math.isinf(t):
        return "-"
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


async def schedules(broker: Broker, as_json: bool) -> int:
    from bus._scheduler import describe_trigger

    async with broker:
        infos = await broker.schedules()
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "name": i.spec.name,
                        "task": i.spec.task_name,
                        "trigger": describe_trigger(i.spec.trigger),
                        "source": i.source,
                        "next_fire": i.next_fire,
                        "last_fire": i.state.last_fire,
                        "fires": i.state.fires,
                        "misses": i.state.misses,
                    }
                    for i in infos
                ],
                indent=2,
            )
        )
        return 0
    if not infos:
        print("no schedules")
        return 0
    for i in infos:
        print(
            f"{i.spec.name}  task={i.spec.task_name}  {describe_trigger(i.spec.trigger)}  "
            f"({i.source})  next={_when(i.next_fire)}  last={_when(i.state.last_fire)}  "
            f"fires={i.state.fires}  misses={i.state.misses}"
        )
    return 0


def _letter_json(letter: dict[str, Any]) -> dict[str, Any]:
    """A dead letter for JSON: its data as text, or as base64 when not UTF-8."""
    out = dict(letter)
    data = out.pop("data", b"")
    if isinstance(data, bytes):
        try:
            out["data"] = data.decode("utf-8")
            out["data_encoding"] = "utf-8"
        except UnicodeDecodeError:
            out["data"] = base64.b64encode(data).decode("ascii")
            out["data_encoding"] = "base64"
    return out


async def dead(
    broker: Broker,
    action: str,
    limit: int,
    as_json: bool,
    reason: str | None,
    task: str | None,
) -> int:
    async with broker:
        if action == "list":
            letters = await broker.dead_letters(limit)
            if reason is not None:
                letters = [d for d in letters if reason in str(d.get("reason", ""))]
            if task is not None:
                letters = [d for d in letters if d.get("task_name") == task]
            if as_json:
                print(json.dumps([_letter_json(d) for d in letters], indent=2, default=str))
            elif not letters:
                print("no dead letters")
            else:
                for d in letters:
                    print(f"{d.get('id')}  {d.get('task_name') or '?':<30} {d.get('reason')}")
        elif action == "requeue":
            report = await broker.requeue_dead(limit, reason=reason, task=task)
            if as_json:
                print(json.dumps(report, indent=2, default=str))
            else:
                for r in report:
                    print(f"{r['id']}  {r.get('task_name') or '?':<30} {r['outcome']}")
                n = sum(1 for r in report if r["outcome"] == "requeued")
                print(f"requeued {n} dead letter(s)")
        else:
            n = await broker.purge_dead_letters()
            print(f"purged {n} dead letter(s)")
    return 0


# ------------------------------------------------------------------- dashboard


def _add_dashboard_parser(sub: Any) -> None:
    d = sub.add_parser(
        "dashboard",
        help="serve a web dashboard of MODULE:BROKER",
        epilog="environment: BUS_DASHBOARD_TOKEN, when set, is the token the page and its "
        "API ask for (Authorization: Bearer TOKEN, or the page's login form)",
    )
    d.add_argument("broker", metavar="MODULE:BROKER")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    d.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free one)")
    d.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the dashboard is reached by (repeatable): requests naming "
        "another are refused; needed with a --host that is not a loopback address",
    )
    d.add_argument(
        "--allow-actions",
        action="store_true",
        help="allow requeueing and purging dead letters from the page (each asks to confirm)",
    )
    d.add_argument(
        "--show-payloads",
        action="store_true",
        help="show task arguments, labels and return values (hidden by default)",
    )
    d.add_argument("--log-format", choices=["console", "json"], default=None)
    d.add_argument("--log-level", default="info")


def _dashboard_main(broker: Broker, args: argparse.Namespace) -> int:
    """``bus dashboard``: enter the broker, serve the dashboard until SIGINT/SIGTERM."""
    _in_process_only(broker, "dashboard")
    if not 0 <= args.port < 65536:
        raise CLIError(f"--port must be from 0 to 65535, not {args.port}")
    try:
        from bus.dashboard import serve
        from bus.dashboard._security import TOKEN_FROM_ENV, allowed_hosts_for, resolve_token
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    try:  # refused here, before the broker connects
        allowed_hosts_for(args.host, args.allowed_host, how="--allowed-host NAME")
        token = resolve_token(TOKEN_FROM_ENV)  # BUS_DASHBOARD_TOKEN
    except ValueError as exc:
        raise CLIError(str(exc)) from None

    async def main() -> int:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def stop() -> None:
                async for _ in signals:
                    return

            async with broker, trio.open_nursery() as nursery:
                urls = await nursery.start(
                    functools.partial(
                        serve,
                        broker,
                        host=args.host,
                        port=args.port,
                        allow_actions=args.allow_actions,
                        show_payloads=args.show_payloads,
                        shutdown_trigger=stop,
                        allowed_hosts=args.allowed_host,
                        token=token,
                    )
                )
                mode = "actions allowed" if args.allow_actions else "read-only"
                if token is not None:
                    mode += ", token required"
                print(f"bus dashboard: {urls[0]}/ ({mode})", file=sys.stderr, flush=True)
        return 0

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        raise plain_error(group) from None


# ------------------------------------------------------------------------ main


class _Parser(argparse.ArgumentParser):
    """Reports a usage mistake the way every other bad input is reported: one line
    naming the command and the problem, with where to find the usage; exit 2.
    Sub-command parsers are made of this class too (``add_subparsers`` uses it)."""

    def error(self, message: str) -> NoReturn:
        _usage_error(self.prog.removeprefix("bus").strip(), message)


def _usage_error(command: str, message: str) -> NoReturn:
    where = f"{command}: " if command else ""
    _fail(f"{where}{message} (see '{f'bus {command}'.strip()} --help')")


def _parse(args_list: list[str]) -> argparse.Namespace:
    args, extras = _parser().parse_known_args(args_list)
    if extras:  # argparse would blame the top-level parser: name the command
        _usage_error(args.command, f"unrecognized arguments: {' '.join(extras)}")
    return args


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bus", description="Run and inspect trio-bus workers.")
    p.add_argument("--version", action="version", version=f"bus {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    w = sub.add_parser("worker", help="run a worker for MODULE:BROKER")
    w.add_argument("broker", metavar="MODULE:BROKER")
    w.add_argument("--concurrency", type=int, default=None, help="tasks at once per process")
    w.add_argument("--processes", type=int, default=1, help="worker processes to supervise")
    w.add_argument(
        "--queue",
        action="append",
        default=[],
        metavar="NAME",
        help="a queue to consume (repeat for several; default: the broker's default queue)",
    )
    w.add_argument(
        "--shutdown-timeout",
        type=float,
        default=None,
        help="seconds running tasks get after the first SIGINT/SIGTERM",
    )
    w.add_argument(
        "--kill-grace",
        type=float,
        default=KILL_GRACE,
        help="with --processes: SIGKILL children still running S seconds after the "
        "shutdown timeout (default 10)",
    )
    w.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        help="fail if the broker's server cannot be reached within S seconds at start",
    )
    w.add_argument(
        "--no-scheduler",
        action="store_true",
        help="do not run a scheduler beside the worker (periodic tasks)",
    )
    w.add_argument("--log-format", choices=["console", "json"], default=None)
    w.add_argument("--log-level", default="info")
    _add_metrics_option(w)

    sc = sub.add_parser("schedules", help="list the periodic tasks and their ticks")
    sc.add_argument("broker", metavar="MODULE:BROKER")
    sc.add_argument("action", choices=["list"])
    sc.add_argument("--json", action="store_true")
    sc.add_argument("--log-level", default="error")

    s = sub.add_parser("send", help="send a task, optionally wait for its result")
    s.add_argument("broker", metavar="MODULE:BROKER")
    s.add_argument("task", metavar="TASK")
    s.add_argument("--args", default="[]", help="positional arguments as a JSON array")
    s.add_argument("--kwargs", default="{}", help="keyword arguments as a JSON object")
    s.add_argument("--wait", action="store_true", help="wait for the result and print it")
    s.add_argument(
        "--timeout", type=float, default=None, help="give up after S seconds (all of it)"
    )
    s.add_argument("--log-level", default="error")

    i = sub.add_parser("inspect", help="queue length, pending, delayed, dead letters, workers")
    i.add_argument("broker", metavar="MODULE:BROKER")
    i.add_argument("--json", action="store_true")
    i.add_argument("--log-level", default="error")

    d = sub.add_parser("dead", help="list, requeue or purge dead letters")
    d.add_argument("broker", metavar="MODULE:BROKER")
    d.add_argument("action", choices=["list", "requeue", "purge"])
    d.add_argument("--limit", type=int, default=100)
    d.add_argument("--reason", default=None, help="only letters whose reason contains TEXT")
    d.add_argument("--task", default=None, help="only letters of this task")
    d.add_argument("--json", action="store_true")
    d.add_argument("--log-level", default="error")
    _add_dashboard_parser(sub)
    add_workflows_parser(sub)
    return p


def _positive(value: float | None, what: str, *, zero: bool = False) -> None:
    if value is not None and (math.isnan(value) or value < 0 or (value == 0 and not zero)):
        raise CLIError(f"{what} must be {'>= 0' if zero else '> 0'}")


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = _parse(args_list)
    try:
        return _main(args, args_list)
    except BaseExceptionGroup as group:
        # One error from inside a nursery: report it as itself, on one line.
        leaf = plain_error(group)
        if isinstance(leaf, BaseExceptionGroup) or not isinstance(leaf, Exception):
            raise
        return _report(leaf, args)


def _report(exc: Exception, args: argparse.Namespace) -> int:
    leaf = plain_error(exc)
    if isinstance(leaf, Exception) and not isinstance(leaf, BaseExceptionGroup):
        exc = leaf
    if isinstance(exc, CLIError):
        _fail(str(exc), exc.code)
    if isinstance(exc, BusError | OSError | NotImplementedError):
        _fail(f"{type(exc).__name__}: {exc}", 1)
    if args.log_level.lower() == "debug":
        raise exc
    _fail(f"{type(exc).__name__}: {exc} (--log-level debug shows the traceback)", 1)


def _main(args: argparse.Namespace, args_list: list[str]) -> int:
    try:
        configure_logging(getattr(args, "log_format", None), args.log_level)
        broker = load_broker(args.broker)
        if args.command == "worker":
            _in_process_only(broker, "worker")
            if args.processes < 1 or (args.concurrency is not None and args.concurrency < 1):
                raise CLIError("--processes and --concurrency must be at least 1")
            timeout = (
                broker.shutdown_timeout if args.shutdown_timeout is None else args.shutdown_timeout
            )
            _positive(timeout, "--shutdown-timeout", zero=True)
            _positive(args.connect_timeout, "--connect-timeout")
            _positive(args.kill_grace, "--kill-grace", zero=True)
            for name in args.queue:
                if not is_queue_name(name):
                    raise CLIError(f"--queue {name!r} is not a queue name")
            if args.metrics_port is not None:
                _metrics_address(args.metrics_port)  # bad input fails here, not in each child
            if args.processes > 1:
                return supervise(args_list, args.processes, timeout, args.kill_grace)
            if args.connect_timeout is not None:
                broker.connect_timeout = args.connect_timeout
            worker_args = (args.concurrency, timeout, args.queue or (), not args.no_scheduler)
            if args.metrics_port is not None:
                return _run_worker_with_metrics(broker, worker_args, args.metrics_port)
            return trio.run(run_worker, broker, *worker_args)
        if args.command == "send":
            call_args = _json_arg(args.args, "args", list)
            call_kwargs = _json_arg(args.kwargs, "kwargs", dict)
            _positive(args.timeout, "--timeout")
            return trio.run(
                send, broker, args.task, call_args, call_kwargs, args.wait, args.timeout
            )
        if args.command == "dashboard":
            return _dashboard_main(broker, args)
        if args.command == "inspect":
            _in_process_only(broker, "inspect")
            return trio.run(inspect, broker, args.json)
        if args.command == "schedules":
            _in_process_only(broker, "schedules")
            return trio.run(schedules, broker, args.json)
        if args.command == "workflows":
            _in_process_only(broker, "workflows")
            return trio.run(show_workflow, broker, parse_workflow_id(args), args.json)
        _in_process_only(broker, "dead")
        return trio.run(dead, broker, args.action, args.limit, args.json, args.reason, args.task)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return _report(exc, args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
