"""A worker process that stops on signals: :func:`run_worker_process`, and the
``bus worker`` command's run of one (the first SIGINT/SIGTERM drains, a second ends at
once)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import structlog
import trio

from bus._broker import Broker, plain_error

if TYPE_CHECKING:
    from bus._worker import Worker

__all__ = ["forced_exit_code", "run_worker", "run_worker_process"]

#: Shows a start-up line: ``(text, event, **fields)``.
Announce = Callable[..., None]


def _print_banner(text: str, event: str, **fields: Any) -> None:
    print(text, file=sys.stderr, flush=True)


def run_worker_process(
    broker: Broker,
    concurrency: int | None = None,
    *,
    queues: Sequence[str] = (),
    shutdown_timeout: float | None = None,
    scheduler: bool = True,
) -> int:
    """Run a worker for ``broker`` in this process until SIGINT or SIGTERM, as
    ``bus worker`` does, and return the exit status for ``sys.exit``::

        if __name__ == "__main__":
            sys.exit(bus.run_worker_process(broker, 16))

    The first signal (Ctrl-C, or the SIGTERM of systemd, Docker or Kubernetes) drains:
    the worker takes no more tasks, running ones get ``shutdown_timeout`` seconds
    (default: the broker's), what still runs then is cancelled and handed back to the
    queue, the last acks are written, and the status is 0. A second signal ends at once
    with ``128 + signal`` (130 after Ctrl-C, 143 after SIGTERM), handing back what runs.
    No traceback either way. ``queues``: the queues to consume (none: the broker's
    default queue); ``scheduler``: run the periodic tasks' scheduler beside it.

    Call it from the main thread, outside Trio (it calls ``trio.run``). It does not
    configure logging: the worker's events go where your structlog configuration
    sends them (unconfigured: warnings and errors to stderr). Inside a Trio program of
    your own, use ``await nursery.start(broker.run_worker)`` and the worker handle it
    gives (``drain``, ``stop``) instead."""
    timeout = broker.shutdown_timeout if shutdown_timeout is None else shutdown_timeout
    try:
        return trio.run(run_worker, broker, concurrency, timeout, tuple(queues), scheduler)
    except BaseExceptionGroup as group:
        raise plain_error(group) from None


#: Two SIGTERMs closer than this are one stop request: systemd's control-group kill
#: and the supervisor's forward of it reach a child together. (SIGINT, from a person
#: at a terminal, always counts: Ctrl-C twice cancels.)
SIGNAL_DEBOUNCE = 1.0

#: After a second stop request, how long a worker may take to cancel what runs and hand
#: it back before its process ends regardless (``forced_exit_code``).
FORCE_GRACE = 1.0


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
    announce: Announce | None = None,
) -> int:
    """Run a worker until SIGINT/SIGTERM and return the exit status.

    The first stop request drains: intake stops, running tasks get
    ``shutdown_timeout`` seconds, what still runs then is interrupted and handed back
    (a sync task is abandoned in its thread), the last acks are written, and the
    status is 0. A second request ends the process at once with ``128 + signal``
    (:func:`forced_exit_code`). A request before the worker has started ends the
    start (0). ``queues``: the queues it consumes (none: the broker's default queue)."""
    log = structlog.get_logger("bus.cli")
    announce = announce or _print_banner
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
                where = " ".join(f"{k}={v}" for k, v in broker.describe().items())
                announce(
                    f"bus worker: {type(broker).__name__} {where + ' ' if where else ''}"
                    f"pid={os.getpid()} concurrency={worker.concurrency} "
                    f"tasks={', '.join(sorted(broker.tasks))}"
                    + (f" queues={','.join(queues)}" if queues else ""),
                    "worker.ready",
                    broker=type(broker).__name__,
                    **broker.describe(),
                    pid=os.getpid(),
                    concurrency=worker.concurrency,
                    tasks=sorted(broker.tasks),
                    **({"queues": list(queues)} if queues else {}),
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
