"""The ``bus`` command: run workers, send tasks, inspect queues, handle dead letters.

The CLI is an application, so unlike the library it configures structlog (console
output on a terminal, JSON lines otherwise).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import structlog
import trio

from bus._broker import Broker, plain_error
from bus._errors import BusError, ResultTimeout
from bus._message import TaskResult, TaskStatus

__all__ = ["main"]


class CLIError(Exception):
    """A problem to report on one line, with exit code 2."""


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"bus: error: {message}", file=sys.stderr)
    raise SystemExit(code)


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
    """Console on a terminal, JSON lines otherwise (or as ``fmt`` says)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise CLIError(f"unknown log level {level!r} (debug, info, warning, error)")
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
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
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
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


# ---------------------------------------------------------------------- worker


async def run_worker(broker: Broker, concurrency: int | None, shutdown_timeout: float) -> int:
    """Run a worker until SIGINT/SIGTERM: the first drains (within ``shutdown_timeout``),
    a second cancels at once. Unfinished tasks stay unacknowledged on Redis."""
    log = structlog.get_logger("bus.cli")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, concurrency)
            print(
                f"bus worker: {type(broker).__name__} pid={os.getpid()} "
                f"concurrency={worker.concurrency} tasks={', '.join(sorted(broker.tasks))}",
                file=sys.stderr,
                flush=True,
            )
            async for signum in signals:
                log.info(
                    "worker.draining", signal=signal.Signals(signum).name, timeout=shutdown_timeout
                )
                break
            else:  # pragma: no cover - the receiver never ends by itself
                return 0

            async def hard_stop() -> None:
                async for signum in signals:
                    log.warning("worker.cancelling", signal=signal.Signals(signum).name)
                    worker.stop()
                    return

            nursery.start_soon(hard_stop)
            await worker.drain(shutdown_timeout)
            worker.stop()
            nursery.cancel_scope.cancel()
    return 0


def supervise(argv: list[str], processes: int, max_restarts: int = 5, window: float = 60.0) -> int:
    """Run ``processes`` copies of this worker command, forward SIGINT/SIGTERM, restart a
    crashed one with backoff; exit 1 when they keep crashing."""
    return trio.run(_supervise, argv, processes, max_restarts, window)


async def _supervise(argv: list[str], processes: int, max_restarts: int, window: float) -> int:
    log = structlog.get_logger("bus.cli")
    cmd = [sys.executable, "-m", "bus", *argv]
    procs: dict[int, trio.Process] = {}
    crashes: list[float] = []
    stopping = trio.Event()
    failed = False

    async def keep(slot: int) -> None:
        nonlocal failed
        backoff = 0.5
        restarts = 0
        while not stopping.is_set():
            proc = await trio.lowlevel.open_process(cmd, env=_slot_env(slot, restarts))
            restarts += 1
            procs[slot] = proc
            log.info("supervisor.started", slot=slot, pid=proc.pid)
            code = await proc.wait()
            del procs[slot]
            if stopping.is_set():
                return
            now = trio.current_time()
            crashes.append(now)
            recent = [t for t in crashes if now - t < window]
            log.warning(
                "supervisor.crashed", slot=slot, pid=proc.pid, code=code, recent_crashes=len(recent)
            )
            if len(recent) > max_restarts:
                failed = True
                stop_all(signal.SIGTERM)
                return
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    def stop_all(signum: int) -> None:
        stopping.set()
        for proc in list(procs.values()):
            if proc.returncode is None:
                proc.send_signal(signum)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as outer:

            async def forward() -> None:
                async for signum in signals:
                    stop_all(signum)  # a second signal is forwarded too: children cancel

            outer.start_soon(forward)
            async with trio.open_nursery() as slots:
                for slot in range(processes):
                    slots.start_soon(keep, slot)
            outer.cancel_scope.cancel()  # every slot has ended
    return 1 if failed else 0


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


def _run_worker_with_metrics(
    broker: Broker, concurrency: int | None, shutdown_timeout: float, address: str
) -> int:
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
            code = await run_worker(broker, concurrency, shutdown_timeout)
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
        known = ", ".join(sorted(broker.tasks)) or "none"
        raise CLIError(f"unknown task {task_name!r}; registered tasks: {known}")
    async with broker:
        handle = await task.kiq(*args, **kwargs)
        if not wait:
            print(handle.task_id)
            return 0
        try:
            result = await handle.wait_result(timeout=timeout)
        except ResultTimeout:
            raise CLIError(f"no result for {handle.task_id} within {timeout}s") from None
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


async def inspect(broker: Broker, as_json: bool) -> int:
    async with broker:
        info = await broker.inspect()
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            if not value:
                print("  (none)")
            for k, v in value.items():
                print(f"  {k:<40} {v}")
        elif isinstance(value, list):
            print(f"{key}:")
            if not value:
                print("  (none)")
            for item in value:
                print(f"  {item}")
        else:
            print(f"{key:<24} {value}")
    return 0


async def dead(broker: Broker, action: str, limit: int, as_json: bool) -> int:
    async with broker:
        if action == "list":
            letters = await broker.dead_letters(limit)
            if as_json:
                print(json.dumps(letters, indent=2, default=str))
            elif not letters:
                print("no dead letters")
            else:
                for d in letters:
                    print(f"{d.get('id')}  {d.get('task_name') or '?':<30} {d.get('reason')}")
        elif action == "requeue":
            n = await broker.requeue_dead_letters(limit)
            print(f"requeued {n} dead letter(s)")
        else:
            n = await broker.purge_dead_letters()
            print(f"purged {n} dead letter(s)")
    return 0


# ------------------------------------------------------------------- dashboard


def _add_dashboard_parser(sub: Any) -> None:
    d = sub.add_parser("dashboard", help="serve a web dashboard of MODULE:BROKER")
    d.add_argument("broker", metavar="MODULE:BROKER")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    d.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free one)")
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
    except ImportError as exc:
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
                    )
                )
                mode = "actions allowed" if args.allow_actions else "read-only"
                print(f"bus dashboard: {urls[0]}/ ({mode})", file=sys.stderr, flush=True)
        return 0

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        raise plain_error(group) from None


# ------------------------------------------------------------------------ main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bus", description="Run and inspect trio-bus workers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    w = sub.add_parser("worker", help="run a worker for MODULE:BROKER")
    w.add_argument("broker", metavar="MODULE:BROKER")
    w.add_argument("--concurrency", type=int, default=None, help="tasks at once per process")
    w.add_argument("--processes", type=int, default=1, help="worker processes to supervise")
    w.add_argument(
        "--shutdown-timeout",
        type=float,
        default=None,
        help="seconds running tasks get after the first SIGINT/SIGTERM",
    )
    w.add_argument("--log-format", choices=["console", "json"], default=None)
    w.add_argument("--log-level", default="info")
    _add_metrics_option(w)

    s = sub.add_parser("send", help="send a task, optionally wait for its result")
    s.add_argument("broker", metavar="MODULE:BROKER")
    s.add_argument("task", metavar="TASK")
    s.add_argument("--args", default="[]", help="positional arguments as a JSON array")
    s.add_argument("--kwargs", default="{}", help="keyword arguments as a JSON object")
    s.add_argument("--wait", action="store_true", help="wait for the result and print it")
    s.add_argument("--timeout", type=float, default=None, help="with --wait: give up after S")
    s.add_argument("--log-level", default="warning")

    i = sub.add_parser("inspect", help="queue length, pending, delayed, dead letters, workers")
    i.add_argument("broker", metavar="MODULE:BROKER")
    i.add_argument("--json", action="store_true")
    i.add_argument("--log-level", default="warning")

    d = sub.add_parser("dead", help="list, requeue or purge dead letters")
    d.add_argument("broker", metavar="MODULE:BROKER")
    d.add_argument("action", choices=["list", "requeue", "purge"])
    d.add_argument("--limit", type=int, default=100)
    d.add_argument("--json", action="store_true")
    d.add_argument("--log-level", default="warning")
    _add_dashboard_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(args_list)
    try:
        configure_logging(getattr(args, "log_format", None), args.log_level)
        broker = load_broker(args.broker)
        if args.command == "worker":
            _in_process_only(broker, "worker")
            if args.processes < 1 or (args.concurrency is not None and args.concurrency < 1):
                raise CLIError("--processes and --concurrency must be at least 1")
            if args.metrics_port is not None:
                _metrics_address(args.metrics_port)  # bad input fails here, not in each child
            if args.processes > 1:
                # Each child runs this same command as one process (the last value wins).
                return supervise([*args_list, "--processes", "1"], args.processes)
            timeout = (
                broker.shutdown_timeout
                if args.shutdown_timeout is None
                else (args.shutdown_timeout)
            )
            if not timeout >= 0 or math.isnan(timeout):
                raise CLIError("--shutdown-timeout must be >= 0")
            if args.metrics_port is not None:
                return _run_worker_with_metrics(
                    broker, args.concurrency, timeout, args.metrics_port
                )
            return trio.run(run_worker, broker, args.concurrency, timeout)
        if args.command == "send":
            call_args = _json_arg(args.args, "args", list)
            call_kwargs = _json_arg(args.kwargs, "kwargs", dict)
            if args.timeout is not None and not args.wait:
                raise CLIError("--timeout only makes sense with --wait")
            return trio.run(
                send, broker, args.task, call_args, call_kwargs, args.wait, args.timeout
            )
        if args.command == "dashboard":
            return _dashboard_main(broker, args)
        if args.command == "inspect":
            _in_process_only(broker, "inspect")
            return trio.run(inspect, broker, args.json)
        _in_process_only(broker, "dead")
        return trio.run(dead, broker, args.action, args.limit, args.json)
    except CLIError as exc:
        _fail(str(exc))
    except (BusError, OSError, NotImplementedError) as exc:
        _fail(f"{type(exc).__name__}: {exc}", 1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.log_level.lower() == "debug":
            raise
        _fail(f"{type(exc).__name__}: {exc} (--log-level debug shows the traceback)", 1)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
