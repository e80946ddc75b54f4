"""The handle of a sent task, and gathering several."""

from __future__ import annotations

import math
import typing
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import trio

from bus._errors import ResultNotFound, ResultTimeout
from bus._ids import TaskID
from bus._message import TaskResult

if TYPE_CHECKING:
    from bus._broker import Broker

__all__ = ["TaskHandle", "gather"]

R = TypeVar("R")
_new = object.__new__


class TaskHandle(Generic[R]):
    """A sent task: ask for its result, wait for it, cancel it, read its progress."""

    __slots__ = ("_stores", "broker", "task_id")

    def __init__(self, task_id: TaskID, broker: Broker, *, stores_result: bool = True) -> None:
        self.task_id = task_id
        self.broker = broker
        self._stores = stores_result

    def _check_stored(self) -> None:
        if not self._stores:
            raise ResultNotFound(
                str(self.task_id), "the task stores no result (it was sent with store_result=False)"
            )

    async def is_ready(self) -> bool:
        """Whether the final result is stored."""
        return await self.broker.result_backend.is_ready(self.task_id)

    async def get_result(self) -> TaskResult[R]:
        """The stored result; raises :class:`ResultNotFound` when there is none (yet),
        at once for a task sent with ``store_result=False``."""
        self._check_stored()
        return await self.broker.result_backend.get_result(self.task_id)

    def wait_result(self, timeout: float | None = None) -> Coroutine[Any, Any, TaskResult[R]]:
        """Wait for the final result: woken the moment it is stored (no polling).

        Raises :class:`ResultTimeout` after ``timeout`` seconds (the task keeps
        running) and :class:`ResultNotFound` when the result is gone for good, or at
        once when the task was sent with ``store_result=False`` (none will be stored).
        Cancellation: only the wait is abandoned.

        (A plain function that returns the backend's coroutine, to be awaited as
        ``await handle.wait_result()``: one coroutine less on every wait.)
        """
        if not self._stores:
            return self._not_stored()  # raised when awaited, as from any coroutine
        return self.broker.result_backend.wait_result(self.task_id, timeout)

    async def _not_stored(self) -> TaskResult[R]:
        self._check_stored()
        raise AssertionError("unreachable")  # pragma: no cover

    async def cancel(self) -> None:
        """Cancel the task: a queued task never starts, a running one is cancelled at its
        next checkpoint. Either way its result says CANCELLED. A task that already
        finished keeps its result. Returns once the broker took the request."""
        await self.broker.cancel_task(self.task_id)

    async def get_progress(self) -> Any | None:
        """The latest report the task made with ``ctx.set_progress``, or ``None``."""
        return await self.broker.result_backend.get_progress(self.task_id)

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id}>"


def _handle(task_id: TaskID, broker: Broker, stores: bool) -> TaskHandle[Any]:
    """``TaskHandle(task_id, broker, stores_result=stores)`` without the call of the
    class with a keyword (the end of every ``kiq``): the same three slots set."""
    handle: TaskHandle[Any] = _new(TaskHandle)
    handle.task_id = task_id
    handle.broker = broker
    handle._stores = stores
    return handle


async def gather(*handles: TaskHandle[Any], timeout: float | None = None) -> list[TaskResult[Any]]:
    """Wait for every handle's result; return them in the order given.

    Raises :class:`ResultTimeout` (for the first still-missing task) when ``timeout``
    seconds pass before all are in. Cancellation: the waits are abandoned.
    """
    results: list[TaskResult[Any] | None] = [None] * len(handles)
    errors: list[BaseException] = []

    async def one(i: int, h: TaskHandle[Any]) -> None:
        try:
            results[i] = await h.wait_result()
        except Exception as exc:  # kept, and raised plainly below
            errors.append(exc)

    with trio.move_on_after(math.inf if timeout is None else timeout):
        if len(handles) == 1:
            await one(0, handles[0])
        else:
            async with trio.open_nursery() as nursery:
                for i, h in enumerate(handles):
                    nursery.start_soon(one, i, h)
    if errors:
        raise errors[0]
    for i, r in enumerate(results):
        if r is None:
            raise ResultTimeout(handles[i].task_id, math.inf if timeout is None else timeout)
    return typing.cast(list[TaskResult[Any]], results)
