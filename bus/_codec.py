"""Codecs turn messages and results into bytes and back. JSON is the default."""

from __future__ import annotations

import json
import json.decoder
import json.encoder
from typing import Any, Protocol

from bus._ids import TaskID
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus
from bus._options import is_queue_name
from bus._priority import MAX_PRIORITY

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
_PLAIN = frozenset({int, bool, type(None)})


def _plain(value: Any) -> bool:
    t = type(value)
    return (
        t in _PLAIN
        or (t is str and value.isascii())
        or (t is float and value - value == 0.0)  # finite: NaN and inf are refused
    )


class JSONCodec:
    """UTF-8 JSON; tuples come back as lists inside arguments, everything else as sent."""

    def __init__(self) -> None:
        self._enc = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        self._dec = json.JSONDecoder()
        # The C accelerators of the json module, built once instead of per call (the
        # json module's own encode() builds a fresh encoder every time). Same output.
        c_make = getattr(json.encoder, "c_make_encoder", None)
        self._c_encode: Any = None
        if c_make is not None:
            self._c_encode = c_make(
                None, _no_default, json.encoder.encode_basestring, None, ":", ",",
                False, False, False,
            )  # fmt: skip
        self._scan: Any = self._dec.scan_once  # type: ignore[attr-defined]

    def _dumps(self, obj: Any) -> bytes:
        if self._c_encode is None:  # pragma: no cover - pure-Python json
            return self._enc.encode(obj).encode()
        return "".join(self._c_encode(obj, 0)).encode()

    def encodes_trivially(self, message: TaskMessage) -> bool:
        """Whether encoding ``message`` is certain to succeed, from the types alone
        (every argument and label an ``int``, ``bool``, ``None``, finite ``float`` or
        ASCII ``str``): an in-process broker may then skip encoding it."""
        if not message.task_name.isascii():
            return False
        for a in message.args:
            if not _plain(a):
                return False
        if message.kwargs:
            for k, v in message.kwargs.items():
                if not (_plain(v) and k.isascii()):
                    return False
        if message.labels:
            for k, v in message.labels.items():
                if not (_plain(v) and k.isascii()):
                    return False
        return True

    def encode_message(self, message: TaskMessage) -> bytes:
        obj = {
            "id": message.task_id,
            "name": message.task_name,
            "args": message.args,
            "kwargs": message.kwargs,
            "labels": message.labels,
            "attempt": message.attempt,
            "eta": message.eta,
        }
        # Written only when not the default, so a message without them encodes as it
        # did before they existed (and older readers, which ignore them, still agree).
        if message.queue is not None:
            obj["queue"] = message.queue
        if message.priority:
            obj["priority"] = message.priority
        return self._dumps(obj)

    def decode_message(self, data: bytes) -> TaskMessage:
        obj = self._load(data)
        try:
            task_id = TaskID.parse(obj["id"])
            name, args, kwargs = obj["name"], obj["args"], obj["kwargs"]
            labels, attempt, eta = obj.get("labels", {}), obj.get("attempt", 1), obj.get("eta")
            queue, priority = obj.get("queue"), obj.get("priority", 0)
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
        if queue is not None and not is_queue_name(queue):
            raise DecodeError("message field 'queue' must be a queue name or null")
        if type(priority) is not int or not 0 <= priority <= MAX_PRIORITY:
            raise DecodeError(f"message field 'priority' must be an integer, 0 to {MAX_PRIORITY}")
        return TaskMessage(
            task_id=task_id,
            task_name=name,
            args=tuple(args),
            kwargs=kwargs,
            labels=labels,
            attempt=attempt,
            eta=eta,
            queue=queue,
            priority=priority,
        )

    def encode_result(self, result: TaskResult[Any]) -> bytes:
        err = result.error
        return self._dumps(
            {
                "id": result.task_id,
                "status": result.status.value,
                "value": result.return_value,
                "error": None if err is None else [err.type_name, err.message, err.traceback],
                "time": result.execution_time,
                "labels": result.labels,
            }
        )

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
            raw: Any = data
            text = (
                raw
                if isinstance(raw, str)
                else (raw if type(raw) is bytes else bytes(raw)).decode()
            )
            try:
                # Fast path: one object filling the whole text, as our encoder writes.
                obj, end = self._scan(text, 0)
                if end != len(text):
                    raise ValueError("extra data")
            except (StopIteration, ValueError):
                obj = self._dec.decode(text)  # raises with a precise message
        except (UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
            raise DecodeError(f"not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise DecodeError(f"expected a JSON object, got {type(obj).__name__}")
        return obj


def _no_default(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")
