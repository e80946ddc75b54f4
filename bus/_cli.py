"""The ``bus`` command: run workers, send tasks, inspect queues, handle dead letters.

The CLI is an application, so unlike the library it configures structlog (console
output on a terminal, JSON lines otherwise).
"""

from __future__ import annotations

import argparse
import base64
import difflib
import errno
import functools
import importlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import attrs
import structlog
import trio

import actors
from actors._supervision import RestartLimiter
from bus._broker import Broker, plain_error
from bus._errors import BusError, ResultNotFound, ResultTimeout
from bus._ids import TaskID
from bus._message import TaskMessage, TaskResult, TaskStatus
from bus._middleware import Middleware
from bus._options import is_queue_name
from bus._process import FORCE_GRACE, forced_exit_code, run_worker
from bus._process import SIGNAL_DEBOUNCE as SIGNAL_DEBOUNCE
from bus._process import _stop_requests as _stop_requests
from bus._workflow_cli import add_workflows_parser
from bus._workflow_cli import parse_id as parse_workflow_id
from bus._workflow_cli import show as show_workflow

__all__ = ["main"]

#: After the shutdown timeout, how long the supervisor waits before SIGKILL.
KILL_GRACE = 10.0


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
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        dotted = module_name.removesuffix(".py").strip("./").replace("/", ".")
        raise CLIError(
            f"{spec!r} names a file: give its module's dotted path instead, "
            f"e.g. {dotted}:{attr} (run from the folder that holds {dotted.split('.')[0]!r})"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise CLIError(f"no module named {module_name!r} (looked in {os.getcwd()})") from None
        raise CLIError(f"importing {module_name!r} failed: {exc}{_where_raised(exc)}") from None
    except ImportError as exc:
        raise CLIError(f"importing {module_name!r} failed: {exc}{_where_raised(exc)}") from None
    except Exception as exc:
        raise CLIError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}{_where_raised(exc)}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CLIError(
                f"module {module_name!r} has no attribute {attr!r}{_brokers_hint(module)}"
            ) from None
    if not isinstance(obj, Broker):
        kind = type(obj).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise CLIError(f"{spec} is {article} {kind}, not a bus broker{_brokers_hint(module)}")
    return obj


def _where_raised(exc: BaseException) -> str:
    """`` (at FILE, line N)``: where the import failed, the innermost frame outside
    the import machinery (or the file and line of a SyntaxError)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" (at {_shown_path(exc.filename)}, line {exc.lineno})"
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "importlib" not in f.filename and f.filename != __file__
    ]
    if not frames:
        return ""
    return f" (at {_shown_path(frames[-1].filename)}, line {frames[-1].lineno})"


def _shown_path(filename: str) -> str:
    try:
        return os.path.relpath(filename)
    except ValueError:
        return filename


def _brokers_hint(module: Any) -> str:
    """``; did you mean MODULE:NAME?`` for the brokers the module holds."""
    names = sorted(k for k, v in vars(module).items() if isinstance(v, Broker))
    if not names:
        return ""
    return "; did you mean " + " or ".join(f"{module.__name__}:{n}" for n in names) + "?"


#: The format ``configure_logging`` chose ("console" or "json"): the start-up lines of
#: ``bus worker`` and ``bus dashboard`` follow it too.
_log_format = "console"


def configure_logging(fmt: str | None, level: str) -> str:
    """Console on a terminal, JSON lines otherwise (or as ``fmt`` says); return the
    format chosen. The bus's structlog events and every stdlib ``logging`` record (a
    task's ``logging.info``, a library's warning) go through the same renderer to
    stderr, filtered at ``level``. Each event is one write of one line, so lines of
    several processes never interleave."""
    global _log_format
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise CLIError(f"unknown log level {level!r} (debug, info, warning, error)")
    tty = sys.stderr.isatty()
    if fmt is None:
        fmt = "console" if tty else "json"
    _log_format = fmt
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=tty, exception_formatter=structlog.dev.plain_traceback)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # The standard library's logging: rendered like the events above.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)  # a warning too is a line in this format
    return fmt


def _announce(text: str, event: str, **fields: Any) -> None:
    """A start-up line (``bus worker: ...``), shown at every log level: plain text in
    the console format, one JSON object (``event``, ``banner``: the text, and
    ``fields``) in the JSON format."""
    if _log_format == "json":
        import datetime as dt

        now = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        line = json.dumps(
            {"event": event, "banner": text, **fields, "level": "info", "timestamp": now},
            default=str,
        )
    else:
        line = text
    print(line, file=sys.stderr, flush=True)


class _LogSuccesses(Middleware):
    """``bus worker --log-tasks``: a ``task.succeeded`` line (info) for each task that
    succeeds (failures are logged anyway, as warnings)."""

    def __init__(self) -> None:
        self.log = structlog.get_logger("bus.worker")

    def post_execute(self, message: TaskMessage, result: TaskResult[Any]) -> None:
        if result.status is TaskStatus.SUCCESS:
            self.log.info(
                "task.succeeded",
                task_id=str(message.task_id),
                task_name=message.task_name,
                attempt=message.attempt,
                execution_time=round(result.execution_time, 6),
            )


def _in_process_only(broker: Broker, command: str) -> None:
    if not broker.distributed:
        raise CLIError(
            f"`bus {command}` does not apply to {type(broker).__name__}: its queue and worker "
            "live inside one Python process, so no other process can reach them. Use a "
            "broker shared between processes (bus.redis.RedisBroker), or run tasks from "
            "your program inside `async with broker`."
        )


# ---------------------------------------------------------------------- worker


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
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise CLIError(
                f"--metrics-port: cannot listen on {host}:{port}: {_os_reason(exc)}", 1
            ) from None
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(
                functools.partial(serve_metrics, registry, listeners=listeners)
            )
            shown = f"[{host}]" if ":" in host else host
            url = f"http://{shown}:{bound}/metrics"
            _announce(f"bus worker: metrics at {url}", "worker.metrics", url=url)
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
    # `add` for `jobs:add` or `jobs.add`: the name without its module.
    close = [k for k in known if k.rsplit(":", 1)[-1].rsplit(".", 1)[-1] == name]
    close = close or difflib.get_close_matches(name, known, n=1)
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


@attrs.frozen
class _Placement:
    """``bus send --queue --delay --label``."""

    queue: str | None = None
    delay: float | None = None
    labels: dict[str, Any] = attrs.field(factory=dict)


def _labels(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs: VALUE as JSON when it parses (``n=3``, ``on=true``), else as
    the text it is (``team=ops``)."""
    labels: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--label takes KEY=VALUE, not {item!r}")
        try:
            labels[key] = json.loads(text)
        except json.JSONDecodeError:
            labels[key] = text
    return labels


async def send(
    broker: Broker,
    task_name: str,
    args: list[Any],
    kwargs: dict[str, Any],
    wait: bool,
    timeout: float | None,
    placement: _Placement | None = None,
) -> int:
    task = broker.find_task(task_name)
    if task is None:
        raise _unknown_task(broker, task_name)
    _check_call(broker, task_name, args, kwargs)
    placement = placement or _Placement()
    kicker = task.kicker()
    try:
        if placement.labels:
            kicker = kicker.with_labels(**placement.labels)
        if placement.queue is not None:
            kicker = kicker.with_queue(placement.queue)
        if placement.delay:
            kicker = kicker.with_delay(placement.delay)
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    # --timeout bounds everything: reaching the broker, sending, and the wait.
    with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
        async with broker:
            handle = await kicker.kiq(*args, **kwargs)
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


async def result(broker: Broker, task_id: TaskID, wait: bool, timeout: float | None) -> int:
    """``bus result ID``: print the stored result as JSON (exit 0); none: exit 1."""
    with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
        async with broker:
            try:
                if wait:
                    found = await broker.result_backend.wait_result(task_id)
                else:
                    found = await broker.result_backend.get_result(task_id)
            except ResultNotFound as exc:
                raise CLIError(str(exc), 1) from None
    if scope.cancelled_caught:
        raise CLIError(f"no result for {task_id} within {timeout}s (--timeout)", 1)
    print(_result_json(found))
    return 0


def _json_arg(text: str, what: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"--{what} is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, kind):
        want = "a JSON array" if kind is list else "a JSON object"
        hint = ""
        if what == "args" and isinstance(value, dict):
            hint = f"; keyword arguments go in --kwargs {json.dumps(value)!r}"
        elif what == "kwargs" and isinstance(value, list):
            hint = f"; positional arguments go in --args {json.dumps(value)!r}"
        raise CLIError(f"--{what} must be {want}, got {type(value).__name__}{hint}")
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
    queue: str | None = None,
    reset_attempts: bool = False,
) -> int:
    if reset_attempts and action != "requeue":
        raise CLIError("--reset-attempts goes with requeue")
    async with broker:
        if action == "list":
            letters = await broker.dead_letters(limit, queue=queue)
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
            report = await broker.requeue_dead(
                limit, reason=reason, task=task, queue=queue, reset_attempts=reset_attempts
            )
            if as_json:
                print(json.dumps(report, indent=2, default=str))
            else:
                for r in report:
                    print(f"{r['id']}  {r.get('task_name') or '?':<30} {r['outcome']}")
                n = sum(1 for r in report if r["outcome"] == "requeued")
                print(f"requeued {n} dead letter(s)")
        else:
            n = await broker.purge_dead_letters(queue=queue)
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
                _announce(
                    f"bus dashboard: {urls[0]}/ ({mode})", "dashboard.ready", url=f"{urls[0]}/"
                )
        return 0

    try:
        return trio.run(main)
    except (OSError, BaseExceptionGroup) as exc:
        error = plain_error(exc)
        if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
            raise CLIError(
                f"cannot listen on {args.host}:{args.port}: {_os_reason(error)} "
                "(choose another --port, or 0 for any free one)",
                1,
            ) from None
        raise error from None


def _os_reason(exc: OSError) -> str:
    """``address already in use``: an OSError's reason without ``[Errno 98]``."""
    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use (another process listens there)"
    return (exc.strerror or str(exc)).lower()


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
    w.add_argument(
        "--log-format",
        choices=["console", "json"],
        default=None,
        help="console on a terminal, json otherwise (the default); every line of the run, "
        "the tasks' own logging included, is in this format",
    )
    w.add_argument("--log-level", default="info", help="debug, info (default), warning, error")
    w.add_argument(
        "--log-tasks",
        action="store_true",
        help="log a task.succeeded line (info) for each task that succeeds",
    )
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
    s.add_argument("--queue", default=None, metavar="NAME", help="send to this queue")
    s.add_argument(
        "--delay", type=float, default=None, metavar="S", help="start no sooner than S seconds"
    )
    s.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label (repeatable); VALUE is read as JSON when it is JSON, else as text",
    )
    s.add_argument("--wait", action="store_true", help="wait for the result and print it")
    s.add_argument(
        "--timeout", type=float, default=None, help="give up after S seconds (all of it)"
    )
    s.add_argument("--log-level", default="error")

    r = sub.add_parser("result", help="print the stored result of a task (exit 1 if none)")
    r.add_argument("broker", metavar="MODULE:BROKER")
    r.add_argument("task_id", metavar="TASK_ID")
    r.add_argument("--wait", action="store_true", help="wait for the result if not stored yet")
    r.add_argument("--timeout", type=float, default=None, help="with --wait: give up after S s")
    r.add_argument("--log-level", default="error")

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
    d.add_argument(
        "--queue", default=None, metavar="NAME", help="the dead letters of this queue "
        "(default: the broker's default queue)",
    )  # fmt: skip
    d.add_argument(
        "--reset-attempts",
        action="store_true",
        help="requeue: a task that failed for good gets its retries again",
    )
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
        fmt = configure_logging(getattr(args, "log_format", None), args.log_level)
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
                # The children log in the supervisor's format (their stderr is a pipe).
                child = [*args_list, "--log-format", fmt] if args.log_format is None else args_list
                return supervise(child, args.processes, timeout, args.kill_grace)
            if args.log_tasks:
                broker.with_middlewares(_LogSuccesses())
            if args.connect_timeout is not None:
                broker.connect_timeout = args.connect_timeout
            worker_args = (
                args.concurrency,
                timeout,
                args.queue or (),
                not args.no_scheduler,
                _announce,
            )
            if args.metrics_port is not None:
                return _run_worker_with_metrics(broker, worker_args, args.metrics_port)
            return trio.run(run_worker, broker, *worker_args)
        if args.command == "send":
            call_args = _json_arg(args.args, "args", list)
            call_kwargs = _json_arg(args.kwargs, "kwargs", dict)
            _positive(args.timeout, "--timeout")
            _positive(args.delay, "--delay", zero=True)
            if args.queue is not None and not is_queue_name(args.queue):
                raise CLIError(f"--queue {args.queue!r} is not a queue name")
            placement = _Placement(args.queue, args.delay, _labels(args.label))
            return trio.run(
                send, broker, args.task, call_args, call_kwargs, args.wait, args.timeout, placement
            )
        if args.command == "result":
            _in_process_only(broker, "result")
            _positive(args.timeout, "--timeout")
            try:
                task_id = TaskID.parse(args.task_id)
            except ValueError as exc:
                raise CLIError(f"{args.task_id!r} is not a task id: {exc}") from None
            return trio.run(result, broker, task_id, args.wait, args.timeout)
        if args.command == "dashboard":
            return _dashboard_main(broker, args)
        if args.command == "inspect":
            _in_process_only(broker, "inspect")
            return trio.run(inspect, broker, args.json)
        if args.command == "schedules":
            return trio.run(schedules, broker, args.json)
        if args.command == "workflows":
            _in_process_only(broker, "workflows")
            return trio.run(show_workflow, broker, parse_workflow_id(args), args.json)
        _in_process_only(broker, "dead")
        if args.queue is not None and not is_queue_name(args.queue):
            raise CLIError(f"--queue {args.queue!r} is not a queue name")
        return trio.run(
            dead,
            broker,
            args.action,
            args.limit,
            args.json,
            args.reason,
            args.task,
            args.queue,
            args.reset_attempts,
        )
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return _report(exc, args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
