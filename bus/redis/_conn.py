"""One coredis client per component, held open by a task, plus a write coalescer.

coredis needs ``async with client`` around its use; :class:`Connection` enters it in a
task of its own (started in a nursery) so other tasks can share the client. The
:class:`Batcher` gathers writes from many tasks into one pipeline per round trip.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import coredis
import structlog
import trio
from coredis.retry import NoRetryPolicy

from bus.redis._logic import Backoff

__all__ = ["FAULTS", "Batch", "Batcher", "Connection"]

log = structlog.get_logger("bus.redis")

#: What a lost or hung connection raises (coredis's class and the builtin timeout).
FAULTS: tuple[type[BaseException], ...] = (coredis.exceptions.ConnectionError, TimeoutError)

Op = Callable[[Any], Any]


class Batch:
    """Writes that go to Redis in one pipeline; ``await batch.wait()`` until sent."""

    __slots__ = ("done", "error", "ops", "retry_ops")

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.retry_ops: list[Op] = []
        self.done = trio.Event()
        self.error: BaseException | None = None

    async def wait(self) -> None:
        """Return once the batch was executed; raise what the pipeline raised.

        Cancellation: only the wait stops; the writes are sent anyway."""
        await self.done.wait()
        if self.error is not None:
            raise self.error


class Batcher:
    """Coalesces writes: each :meth:`submit` joins the batch being gathered; a single
    flusher task sends each batch as one pipeline (no transaction) as soon as the
    previous one returned, so under load one round trip carries many tasks' writes.

    Ops submitted with ``retry=True`` (idempotent ones, such as XACK) are kept and sent
    again after a connection fault; the others fail their batch.
    """

    def __init__(self, client: coredis.Redis[bytes]) -> None:
        self.client = client
        self._batch = Batch()
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()

    def submit(self, op: Op, *, retry: bool = False) -> Batch:
        batch = self._batch
        (batch.retry_ops if retry else batch.ops).append(op)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wake.set()
        return batch

    async def flush(self) -> None:
        """Wait until everything submitted so far was sent (or failed for good)."""
        while self._batch.ops or self._batch.retry_ops:
            await self._batch.done.wait()
        await self._idle.wait()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        backoff = Backoff()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            batch, self._batch = self._batch, Batch()
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for op in batch.ops:
                        op(pipe)
                    for op in batch.retry_ops:
                        op(pipe)
            except FAULTS as exc:
                batch.error = exc
                if batch.retry_ops:
                    self._batch.retry_ops[:0] = batch.retry_ops
                    self._wake.set()
                    log.warning("redis.batch_retry", error=repr(exc), ops=len(batch.retry_ops))
                    await trio.sleep(backoff.next())
            except Exception as exc:
                batch.error = exc
            else:
                backoff.reset()
            batch.done.set()
            if not (self._batch.ops or self._batch.retry_ops):
                self._idle.set()


class Connection:
    """A coredis client for ``url`` with our settings, held open by :meth:`hold`."""

    def __init__(self, url: str, *, name: str, block_seconds: float, **options: Any) -> None:
        opts: dict[str, Any] = {
            "decode_responses": False,
            "retry_policy": NoRetryPolicy(),
            "stream_timeout": block_seconds + 10.0,
            "connect_timeout": 5.0,
            "client_name": name,
        }
        opts.update(options)
        self.url = url
        self.client: coredis.Redis[bytes] = coredis.Redis.from_url(url, **opts)
        self.batcher = Batcher(self.client)

    async def hold(
        self,
        inside: Callable[..., Awaitable[Any]] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the client open (and the batcher running) until cancelled.

        ``inside`` (started with ``nursery.start``) runs within the client's lifetime,
        so it is cancelled before the client's connections close."""
        async with self.client, trio.open_nursery() as nursery:
            await nursery.start(self.batcher.run)
            if inside is not None:
                await nursery.start(inside)
            task_status.started()
            await trio.sleep_forever()
