"""Codecs turn messages and results into bytes and back. JSON is the default."""

from __future__ import annotations

import json
from typing import Any, Protocol

from bus._ids import TaskID
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus

__all__ = ["Codec", "DecodeError", "JSONCodec"]


class DecodeError(ValueError):
    """Bytes that are not a valid message or result; the text says what is wrong."""


class Codec(Protocol):
    """What a codec provides. Encoders raise ``TypeError``/``ValueError`` on values they
    cannot represent; decoders raise :class:`DecodeError` and never import classes."""

    def encode_message(self, message: TaskMessage) -> bytes: ...
    def decode_message(self, data: bytes) -> TaskMessage: ...
    def encode_result(self, result: TaskResult[Any]) -> bytes: ...
    def decode_result(self, data: bytes) -> TaskResult[Any]: ...


_STATUSES = {s.value: s for s in TaskStatus}


class JSONCodec:
    """UTF-8 JSON; tuples come back as lists inside arguments, everything else as sent."""

    def __init__(self) -> None:
        self._enc = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        self._dec = json.JSONDecoder()

    def encode_message(self, message: TaskMessage) -> bytes:
        return self._enc.encode(
            {
                "id": message.task_id,
                "name": message.task_name,
                "args": message.args,
                "kwargs": message.kwargs,
                "labels": message.labels,
                "attempt": message.attempt,
                "eta": message.eta,
            }
        ).encode()

    def decode_message(self, data: bytes) -> TaskMessage:
        obj = self._load(data)
        try:
            task_id = TaskID.parse(obj["id"])
            name, args, kwargs = obj["name"], obj["args"], obj["kwargs"]
            labels, attempt, eta = obj.get("labels", {}), obj.get("attempt", 1), obj.get("eta")
        except KeyError as exc:
            raise DecodeError(f"message has no {exc.args[0]!r} field") from None
        except ValueError as exc:
            raise DecodeError(str(exc)) from None
        if not isinstance(name, str) or not name:
            raise DecodeError("message field 'name' must be a non-empty string")
        if not isinstance(args, list):
            raise DecodeError("message field 'args' must be a list")
        if not isinstance(kwargs, dict):
            raise DecodeError("message field 'kwargs' must be an object")
        if not isinstance(labels, dict):
            raise DecodeError("message field 'labels' must be an object")
        if type(attempt) is not int or attempt < 1:
            raise DecodeError("message field 'attempt' must be a positive integer")
        if eta is not None and type(eta) not in (int, float):
            raise DecodeError("message field 'eta' must be a number or null")
        return TaskMessage(
            task_id=task_id,
            task_name=name,
            args=tuple(args),
            kwargs=kwargs,
            labels=labels,
            attempt=attempt,
            eta=eta,
        )

    def encode_result(self, result: TaskResult[Any]) -> bytes:
        err = result.error
        return self._enc.encode(
            {
                "id": result.task_id,
                "status": result.status.value,
                "value": result.return_value,
                "error": None if err is None else [err.type_name, err.message, err.traceback],
                "time": result.execution_time,
                "labels": result.labels,
            }
        ).encode()

    def decode_result(self, data: bytes) -> TaskResult[Any]:
        obj = self._load(data)
        try:
            task_id = TaskID.parse(obj["id"])
            status = _STATUSES[obj["status"]]
            err = obj.get("error")
            error = None if err is None else RemoteError(str(err[0]), str(err[1]), str(err[2]))
            return TaskResult(
                task_id=task_id,
                status=status,
                return_value=obj.get("value"),
                error=error,
                execution_time=float(obj.get("time", 0.0)),
                labels=dict(obj.get("labels") or {}),
            )
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise DecodeError(f"not a task result: {exc!r}") from None

    def _load(self, data: bytes) -> dict[str, Any]:
        try:
            text = data.decode() if isinstance(data, bytes | bytearray | memoryview) else data
            obj = self._dec.decode(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise DecodeError(f"not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise DecodeError(f"expected a JSON object, got {type(obj).__name__}")
        return obj
