"""Codecs turn messages and results into bytes and back. JSON is the default."""

from __future__ import annotations

import json
import json.decoder
import json.encoder
import re
from array import array
from itertools import accumulate
from typing import Any, Protocol

from bus._frozen import freeze_args, freeze_mapping
from bus._ids import TaskID
from bus._make import maker
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus
from bus._options import MAX_ETA, MAX_RETRIES, is_queue_name
from bus._priority import MAX_PRIORITY

__all__ = ["MAX_BYTES", "MAX_DEPTH", "Codec", "DecodeError", "JSONCodec", "too_deep"]

MAX_DEPTH = 64
"""How deeply the JSON of a message or a result may nest arrays and objects: the
message's own object is one level and its ``args`` array another, so an argument may
nest 62 levels. Deeper bytes are refused before they are parsed (:class:`DecodeError`),
and the encoder refuses to write them."""
MAX_BYTES = 64 * 1024 * 1024
"""The largest message or result :class:`JSONCodec` reads or writes (64 MiB): larger
bytes are refused before they are parsed. A broker may cap messages lower (the Redis
setting ``max_message_bytes``)."""

#: A JSON string, escapes included (in UTF-8 bytes: no byte of a multi-byte character
#: is a quote, a backslash or a bracket).
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.S)
#: Opening brackets become 1, closing ones -1 (as signed bytes); the rest is deleted.
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def too_deep(data: bytes | str, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON ``data`` nests arrays and objects more than ``limit`` levels,
    found without parsing it (brackets inside strings do not count). Cheap when it
    holds few brackets (counting them is enough); otherwise a few passes in C over the
    bytes, about as long as parsing them."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    steps = array("b", _STRING.sub(b"", data).translate(_STEP, _NOT_BRACKET))
    return max(accumulate(steps), default=0) > limit


class DecodeError(ValueError):
    """Bytes that are not a valid message or result; the text says what is wrong."""


class Codec(Protocol):
    """What a codec provides. Encoders raise ``TypeError``/``ValueError`` on values they
    cannot represent; decoders raise :class:`DecodeError` and nothing else (whatever the
    bytes: a reader hands what it cannot decode to the worker, which rejects it), and
    never import classes."""

    def encode_message(self, message: TaskMessage) -> bytes: ...
    def decode_message(self, data: bytes) -> TaskMessage: ...
    def encode_result(self, result: TaskResult[Any]) -> bytes: ...
    def decode_result(self, data: bytes) -> TaskResult[Any]: ...


_STATUSES = {s.value: s for s in TaskStatus}
_make_message = maker(TaskMessage, converted=True)
_STATUS_JSON = {s: json.dumps(s.value).encode() for s in TaskStatus}
_PLAIN = frozenset({int, bool, type(None)})


def _plain(value: Any) -> bool:
    t = type(value)
    return (
        t in _PLAIN
        or (t is str and value.isascii())
        or (t is float and value - value == 0.0)  # finite: NaN and inf are refused
    )


class JSONCodec:
    """UTF-8 JSON; tuples come back as lists inside arguments, everything else as sent.

    Bounded both ways: a message or result is at most ``max_bytes`` long and nests at
    most ``max_depth`` levels (see :data:`MAX_BYTES`, :data:`MAX_DEPTH`). The encoder
    refuses more (``ValueError``); the decoders refuse it before parsing
    (:class:`DecodeError`), and turn every other failure into a :class:`DecodeError`
    too. ``NaN`` and ``Infinity`` are refused both ways."""

    def __init__(self, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> None:
        for name, value in (("max_bytes", max_bytes), ("max_depth", max_depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be a whole number >= 2, not {value!r}")
        if max_depth > 500:
            raise ValueError(f"max_depth must be at most 500 (Python's recursion), not {max_depth}")
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self._enc = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        self._dec = json.JSONDecoder(parse_constant=_no_constant)
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
        #: The encoded ``,"name":...,"args":`` of each task name (_encode_plain).
        self._plain_heads: dict[str, bytes] = {}

    def _dumps(self, obj: Any) -> bytes:
        c_encode = self._c_encode
        # (No C accelerators: the pure-Python json.)
        text = "".join(c_encode(obj, 0)) if c_encode is not None else self._enc.encode(obj)
        data = text.encode()
        return self._bounded(data, data, self.max_depth)

    def _bounded(self, data: bytes, nested: bytes, depth: int) -> bytes:
        """``data``, checked: what the decoder would refuse is not written. ``nested``
        is the part of it that may nest, at most ``depth`` levels (all of it, or the
        arguments or value inside a template's one level)."""
        if len(data) > self.max_bytes:
            raise ValueError(f"{len(data)} bytes encoded, more than max_bytes={self.max_bytes}")
        if too_deep(nested, depth):
            raise ValueError(f"nested more than {self.max_depth} levels deep (max_depth)")
        return data

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
        if (
            not message.kwargs
            and not message.labels
            and message.eta is None
            and message.attempt == 1
            and type(message.attempt) is int  # (True == 1 too, but encodes as true)
            and message.queue is None
            and not message.priority
            and self._c_encode is not None
        ):
            return self._encode_plain(message)
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

    def _encode_plain(self, message: TaskMessage) -> bytes:
        """:meth:`encode_message` of the usual message (positional arguments only, no
        labels, no delay, a first attempt, the default queue and priority): the same
        bytes, with only the id and the arguments encoded (the rest is fixed, or
        fixed per task name)."""
        name = message.task_name
        head = self._plain_heads.get(name)
        if head is None:
            head = f',"name":{_encode_str(name)},"args":'.encode()
            if len(self._plain_heads) < _PLAIN_HEADS:  # (names are few; bounded anyway)
                self._plain_heads[name] = head
        args = message.args
        packed = "".join(self._c_encode(args, 0)).encode() if args else b"[]"
        data = b'{"id":%b%b%b%b' % (
            _encode_str(message.task_id).encode(),
            head,
            packed,
            _PLAIN_TAIL,
        )
        # The envelope is one level: the arguments may nest one level less.
        return self._bounded(data, packed, self.max_depth - 1)

    def decode_message(self, data: bytes) -> TaskMessage:
        try:
            return self._decode_message(data)
        except DecodeError:
            raise
        except (RecursionError, MemoryError, OverflowError, ValueError, TypeError) as exc:
            raise DecodeError(f"not a task message: {type(exc).__name__}: {exc}") from None

    def _decode_message(self, data: bytes) -> TaskMessage:
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
        if type(attempt) is not int or not 1 <= attempt <= MAX_RETRIES + 1:
            raise DecodeError(f"message field 'attempt' must be an integer, 1 to {MAX_RETRIES + 1}")
        if eta is not None and (
            type(eta) not in (int, float) or not abs(eta) <= MAX_ETA  # NaN, inf, huge ints
        ):
            raise DecodeError(
                f"message field 'eta' must be a Unix time (at most {MAX_ETA:g}) or null"
            )
        if queue is not None and not is_queue_name(queue):
            raise DecodeError("message field 'queue' must be a queue name or null")
        if type(priority) is not int or not 0 <= priority <= MAX_PRIORITY:
            raise DecodeError(f"message field 'priority' must be an integer, 0 to {MAX_PRIORITY}")
        # (TaskMessage(...) with its converters' work done here: see bus._make)
        return _make_message(
            task_id, name, freeze_args(args), freeze_mapping(kwargs), freeze_mapping(labels),
            attempt, eta, queue, priority,
        )  # fmt: skip

    def encode_result(self, result: TaskResult[Any]) -> bytes:
        err = result.error
        took = result.execution_time
        if (
            err is None
            and not result.labels
            and type(took) is float
            and took - took == 0.0  # (finite: NaN and inf go the whole way, refused)
            and self._c_encode is not None
        ):
            return self._encode_plain_result(result, took)
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

    def _encode_plain_result(self, result: TaskResult[Any], took: float) -> bytes:
        """:meth:`encode_result` of the usual result (no error, no labels): the same
        bytes, with only the id, the value and the time encoded."""
        value = result.return_value
        packed = b"null" if value is None else "".join(self._c_encode(value, 0)).encode()
        data = b'{"id":%b,"status":%b,"value":%b,"error":null,"time":%b,"labels":{}}' % (
            _encode_str(result.task_id).encode(),
            _STATUS_JSON[result.status],
            packed,
            float.__repr__(took).encode(),
        )
        # The envelope is one level: the value may nest one level less.
        return self._bounded(data, packed, self.max_depth - 1)

    def decode_result(self, data: bytes) -> TaskResult[Any]:
        try:
            return self._decode_result(data)
        except DecodeError:
            raise
        except (RecursionError, MemoryError, OverflowError, ValueError, TypeError) as exc:
            raise DecodeError(f"not a task result: {type(exc).__name__}: {exc}") from None

    def _decode_result(self, data: bytes) -> TaskResult[Any]:
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
            if len(raw) > self.max_bytes:  # before anything is parsed
                raise DecodeError(f"{len(raw)} bytes, more than max_bytes={self.max_bytes}")
            if not isinstance(raw, str) and type(raw) is not bytes:
                raw = bytes(raw)
            if too_deep(raw, self.max_depth):  # before json parses (and recurses)
                raise DecodeError(f"nested more than {self.max_depth} levels deep (max_depth)")
            text = raw if isinstance(raw, str) else raw.decode()
            try:
                # Fast path: one object filling the whole text, as our encoder writes.
                obj, end = self._scan(text, 0)
                if end != len(text):
                    raise ValueError("extra data")
            except (StopIteration, ValueError):
                obj = self._dec.decode(text)  # raises with a precise message
        except DecodeError:
            raise
        except (ValueError, TypeError, RecursionError, MemoryError, OverflowError) as exc:
            raise DecodeError(f"not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise DecodeError(f"expected a JSON object, got {type(obj).__name__}")
        return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


#: The JSON of a string (quotes and escapes), as the encoder writes it (not ASCII-only).
_encode_str = json.encoder.encode_basestring
#: How a usual message ends (see JSONCodec._encode_plain), and how many task names'
#: beginnings are kept.
_PLAIN_TAIL = b',"kwargs":{},"labels":{},"attempt":1,"eta":null}'
_PLAIN_HEADS = 1024


def _no_default(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")
