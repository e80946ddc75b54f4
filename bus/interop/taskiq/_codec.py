"""taskiq's JSON wire format as a :class:`bus.Codec`.

A taskiq message (``taskiq.message.TaskiqMessage``, as its default JSON serializer
writes it)::

    {"task_id": "<uuid4 hex>", "task_name": "mod:add", "labels": {"timeout": "5"},
     "labels_types": {"timeout": 2}, "args": [1, 2], "kwargs": {}}

Label values travel as strings with a type code (:data:`LABEL_TYPES`); labels without
one are kept as they are. A taskiq result (``taskiq.result.TaskiqResult``)::

    {"is_err": false, "log": null, "return_value": 3, "execution_time": 0.01,
     "labels": {...}, "error": null}

with ``error`` a taskiq ``ExceptionRepr`` (``exc_type``, ``exc_message``,
``exc_module``, ``exc_cause``, ``exc_context``, ...) when the task failed.

What the bus knows and taskiq has no field for (a message's ``eta``, a result's task
id, status and traceback) travels in one extra key, ``"trio_bus"``, which taskiq's
models ignore.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any

from bus._codec import MAX_BYTES, MAX_DEPTH, DecodeError, too_deep
from bus._ids import TaskID
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus
from bus._options import MAX_RETRIES, is_queue_name
from bus._priority import MAX_PRIORITY

__all__ = ["DEFAULT_MAX_RETRIES", "EXTRA", "LABEL_TYPES", "TaskiqCodec"]

LABEL_TYPES = {"ANY": 1, "INT": 2, "STR": 3, "FLOAT": 4, "BOOL": 5, "BYTES": 6}
"""taskiq's label type codes (``taskiq.labels.LabelType``): the ``labels_types`` of a
message. ``ANY`` values are kept as they are; ``BYTES`` (base64) are kept as their
base64 text (labels are JSON values here)."""
_ANY, _INT, _STR, _FLOAT, _BOOL, _BYTES = (LABEL_TYPES[k] for k in LABEL_TYPES)

EXTRA = "trio_bus"
"""The key of a message or result that carries what taskiq has no field for."""
DEFAULT_MAX_RETRIES = 3
"""taskiq's ``SimpleRetryMiddleware(default_retry_count=3)``: the runs a task with
``retry_on_error`` and no ``max_retries`` label gets."""

_STATUSES = {s.value: s for s in TaskStatus}
_CODEC_ERRORS = (RecursionError, MemoryError, OverflowError, ValueError, TypeError)


def _retries_of(labels: Mapping[str, Any]) -> int | None:
    """The bus's ``retries`` for taskiq's ``retry_on_error`` / ``max_retries`` labels:
    taskiq's retry middlewares run a task at most ``max_retries`` times in all (so
    ``max_retries - 1`` retries); ``None`` without ``retry_on_error``."""
    flag = labels.get("retry_on_error")
    if flag is None:
        return None
    if isinstance(flag, str):
        flag = flag.lower() == "true"
    if not flag:
        return 0
    most = labels.get("max_retries", DEFAULT_MAX_RETRIES)
    if isinstance(most, bool) or not isinstance(most, int | str):
        raise DecodeError(f"label 'max_retries' must be a whole number, not {most!r}")
    try:
        runs = int(most)
    except ValueError:
        raise DecodeError(f"label 'max_retries' must be a whole number, not {most!r}") from None
    return min(max(0, runs - 1), MAX_RETRIES)


class TaskiqCodec:
    """Reads and writes taskiq's JSON ``TaskiqMessage`` and ``TaskiqResult``.

    Messages. taskiq's task ids (``uuid4().hex``) are accepted, and kept as written, so
    a result is stored under the key taskiq looks for (``TaskID.parse(...,
    any_uuid=True)``; ids of any other shape are refused). Labels are decoded by their
    type codes and encoded with them. Labels that mean an option of the bus map to it
    both ways, and stay in the labels (so a message re-encoded for a retry says what it
    said):

    - ``timeout`` is the bus's ``timeout`` (the same name and meaning);
    - ``retry_on_error`` / ``max_retries`` (taskiq's retry middlewares: at most
      ``max_retries`` runs, 3 by default) become ``retries = max_retries - 1`` unless a
      ``retries`` label is there; a message with ``retries`` gets ``retry_on_error`` and
      ``max_retries = retries + 1`` for a taskiq worker;
    - ``_retries`` (how many times taskiq's middleware re-sent it) is the attempt:
      ``attempt = _retries + 1``, both ways;
    - ``priority`` (an integer 0 to 9) is the message's priority, ``queue_name`` its
      queue (the stream taskiq-redis sends it to);
    - ``delay`` is kept as a label: a delay the bus sends is served before the message
      reaches the stream (taskiq-redis's stream broker ignores the label).

    Every other label is kept. Results: an error (taskiq's ``ExceptionRepr``) becomes a
    :class:`~bus.RemoteError` of its type's qualified name and message; no class is
    ever imported. A result taskiq wrote carries no task id: the result backend passes
    the id it read it under (``decode_result(data, task_id=...)``).

    Bounded as :class:`~bus.JSONCodec` is (``max_bytes``, ``max_depth``); decoding
    raises :class:`~bus.DecodeError` and nothing else.
    """

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

    # ------------------------------------------------------------- messages

    def encode_message(self, message: TaskMessage) -> bytes:
        labels: dict[str, Any] = dict(message.labels)
        retries = labels.get("retries")
        if (
            isinstance(retries, int)
            and not isinstance(retries, bool)
            and "retry_on_error" not in labels
        ):
            labels["retry_on_error"] = retries > 0
            labels["max_retries"] = retries + 1
        if message.attempt > 1:
            labels["_retries"] = message.attempt - 1
        else:
            labels.pop("_retries", None)
        if message.priority:
            labels["priority"] = message.priority
        if message.queue is not None:
            labels["queue_name"] = message.queue
        values: dict[str, Any] = {}
        types: dict[str, int] = {}
        for key, value in labels.items():
            values[key], types[key] = _label_out(value)
        obj: dict[str, Any] = {
            "task_id": str(message.task_id),
            "task_name": message.task_name,
            "labels": values,
            "labels_types": types,
            "args": message.args,
            "kwargs": message.kwargs,
        }
        if message.eta is not None:
            obj[EXTRA] = {"eta": message.eta}
        return self._dumps(obj)

    def decode_message(self, data: bytes) -> TaskMessage:
        try:
            return self._decode_message(data)
        except DecodeError:
            raise
        except _CODEC_ERRORS as exc:
            raise DecodeError(f"not a taskiq message: {type(exc).__name__}: {exc}") from None

    def _decode_message(self, data: bytes) -> TaskMessage:
        obj = self._load(data)
        for field in ("task_id", "task_name", "args", "kwargs"):
            if field not in obj:
                raise DecodeError(f"taskiq message has no {field!r} field")
        try:
            task_id = TaskID.parse(obj["task_id"], any_uuid=True)
        except ValueError as exc:
            raise DecodeError(str(exc)) from None
        name, args, kwargs = obj["task_name"], obj["args"], obj["kwargs"]
        raw_labels, types = obj.get("labels") or {}, obj.get("labels_types") or {}
        if not isinstance(name, str) or not name:
            raise DecodeError("taskiq message field 'task_name' must be a non-empty string")
        if not isinstance(args, list):
            raise DecodeError("taskiq message field 'args' must be a list")
        if not isinstance(kwargs, dict):
            raise DecodeError("taskiq message field 'kwargs' must be an object")
        if not isinstance(raw_labels, dict):
            raise DecodeError("taskiq message field 'labels' must be an object")
        if not isinstance(types, dict):
            raise DecodeError("taskiq message field 'labels_types' must be an object or null")
        labels = {k: _label_in(k, v, types.get(k)) for k, v in raw_labels.items()}

        attempt = 1
        if "_retries" in labels:
            done = labels["_retries"]
            if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= MAX_RETRIES:
                raise DecodeError(f"label '_retries' must be an integer, 0 to {MAX_RETRIES}")
            attempt = done + 1
        if "retries" not in labels:
            retries = _retries_of(labels)
            if retries is not None:
                labels["retries"] = retries
        priority = 0
        p = labels.get("priority")
        if type(p) is int and 0 <= p <= MAX_PRIORITY:
            priority = p
        queue = labels.get("queue_name")
        if queue is not None and not is_queue_name(queue):
            raise DecodeError("label 'queue_name' must be a queue name")
        eta = None
        extra = obj.get(EXTRA)
        if isinstance(extra, dict):
            eta = extra.get("eta")
            if eta is not None and (
                type(eta) not in (int, float) or not (math.isfinite(eta) and abs(eta) <= 1e12)
            ):
                raise DecodeError("the message's eta must be a Unix time or null")
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

    # -------------------------------------------------------------- results

    def encode_result(self, result: TaskResult[Any]) -> bytes:
        err = result.error
        extra: dict[str, Any] = {"task_id": str(result.task_id), "status": result.status.value}
        if err is not None:
            extra["error_type"] = err.type_name  # exactly (taskiq's fields split it)
            if err.traceback:
                extra["traceback"] = err.traceback
        return self._dumps(
            {
                "is_err": result.is_err,
                "log": None,
                "return_value": result.return_value,
                "execution_time": result.execution_time,
                "labels": result.labels,
                "error": None if err is None else _error_out(err),
                EXTRA: extra,
            }
        )

    def decode_result(self, data: bytes, task_id: str | None = None) -> TaskResult[Any]:
        """The result in ``data``; ``task_id`` is the id it was stored under (a result
        taskiq wrote has none of its own): one the bytes name must be the same."""
        try:
            return self._decode_result(data, task_id)
        except DecodeError:
            raise
        except _CODEC_ERRORS as exc:
            raise DecodeError(f"not a taskiq result: {type(exc).__name__}: {exc}") from None

    def _decode_result(self, data: bytes, task_id: str | None) -> TaskResult[Any]:
        obj = self._load(data)
        extra = obj.get(EXTRA)
        extra = extra if isinstance(extra, dict) else {}
        named = extra.get("task_id")
        if named is not None and task_id is not None and named != task_id:
            raise DecodeError(f"the result is that of task {str(named)[:80]!r}, not {task_id}")
        text = named if named is not None else task_id
        if text is None:
            raise DecodeError("a taskiq result names no task: give the task_id it is stored under")
        try:
            tid = TaskID.parse(text, any_uuid=True)
        except ValueError as exc:
            raise DecodeError(str(exc)) from None
        is_err = obj.get("is_err")
        if not isinstance(is_err, bool):
            raise DecodeError("taskiq result field 'is_err' must be true or false")
        status = _STATUSES.get(extra.get("status", ""))
        if status is None or (status is TaskStatus.SUCCESS) == is_err:
            status = TaskStatus.FAILURE if is_err else TaskStatus.SUCCESS
        took = obj.get("execution_time", 0.0)
        if isinstance(took, bool) or not isinstance(took, int | float) or not math.isfinite(took):
            raise DecodeError("taskiq result field 'execution_time' must be a number")
        labels = obj.get("labels") or {}
        if not isinstance(labels, dict):
            raise DecodeError("taskiq result field 'labels' must be an object")
        error = None
        if is_err:
            tb = extra.get("traceback")
            error = _error_in(obj.get("error"), tb if isinstance(tb, str) else "")
            kind = extra.get("error_type")
            if isinstance(kind, str) and kind:
                error = RemoteError(kind, error.message, error.traceback)
        return TaskResult(
            task_id=tid,
            status=status,
            return_value=None if is_err else obj.get("return_value"),
            error=error,
            execution_time=float(took),
            labels=labels,
        )

    # ---------------------------------------------------------------- bytes

    def _dumps(self, obj: Any) -> bytes:
        text = self._enc.encode(obj)
        data = text.encode()
        if len(data) > self.max_bytes:
            raise ValueError(f"{len(data)} bytes encoded, more than max_bytes={self.max_bytes}")
        if too_deep(text, self.max_depth):
            raise ValueError(f"nested more than {self.max_depth} levels deep (max_depth)")
        return data

    def _load(self, data: bytes) -> dict[str, Any]:
        try:
            raw: Any = data
            if len(raw) > self.max_bytes:
                raise DecodeError(f"{len(raw)} bytes, more than max_bytes={self.max_bytes}")
            text = raw if isinstance(raw, str) else bytes(raw).decode()
            if too_deep(text, self.max_depth):
                raise DecodeError(f"nested more than {self.max_depth} levels deep (max_depth)")
            obj = self._dec.decode(text)
        except DecodeError:
            raise
        except _CODEC_ERRORS as exc:
            raise DecodeError(f"not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise DecodeError(f"expected a JSON object, got {type(obj).__name__}")
        return obj


# ------------------------------------------------------------------ labels


def _label_out(value: Any) -> tuple[Any, int]:
    """A label as taskiq's ``prepare_label`` writes it: text and a type code; other
    JSON values (null, lists, objects) as they are, typed ANY (which taskiq keeps)."""
    t = type(value)
    if t is bool:
        return ("True" if value else "False"), _BOOL
    if t is int:
        return str(value), _INT
    if t is float:
        return repr(value), _FLOAT
    if t is str:
        return value, _STR
    return value, _ANY


def _label_in(key: str, value: Any, code: Any) -> Any:
    """A label's value from its text and type code (as taskiq's ``parse_label``)."""
    if code is None or code == _ANY:
        return value
    if isinstance(value, dict | list) or value is None:
        raise DecodeError(f"label {key!r} of type {code!r} holds {type(value).__name__}")
    text = value if isinstance(value, str) else str(value)
    try:
        if code == _STR:
            return text
        if code == _INT:
            return int(text)
        if code == _FLOAT:
            f = float(text)
            if not math.isfinite(f):
                raise ValueError("not a finite number")
            return f
        if code == _BOOL:
            return text.lower() == "true"
        if code == _BYTES:
            base64.b64decode(text, validate=True)
            return text
    except (ValueError, binascii.Error) as exc:
        raise DecodeError(f"label {key!r} is not of its type {code!r}: {exc}") from None
    raise DecodeError(f"label {key!r} has an unknown type code {code!r}")


# ------------------------------------------------------------------ errors


def _error_out(err: RemoteError) -> dict[str, Any]:
    """A :class:`RemoteError` as taskiq's ``ExceptionRepr``. A timeout is the
    ``TimeoutError`` a taskiq worker's timeout raises; the bus's other own kinds
    (``bus.Cancelled``, ``bus.Rejected``, ...) have no module, so a taskiq client makes
    a class of that name instead of looking one up."""
    name = err.type_name
    module: str | None = "builtins"
    if name == "bus.Timeout":  # what a taskiq worker's timeout raises
        name = "TimeoutError"
    elif name.startswith("bus."):
        module, name = None, name[4:]
    elif "." in name:
        module, name = name.rsplit(".", 1)
    return {
        "exc_type": name,
        "exc_message": [err.message],
        "exc_module": module,
        "exc_cause": None,
        "exc_context": None,
        "exc_suppress_context": False,
    }


def _error_in(raw: Any, traceback: str = "", depth: int = 0) -> RemoteError:
    """taskiq's ``ExceptionRepr`` as a :class:`RemoteError`: the type's qualified name
    (the module's, then the type's; builtins bare, as the bus names them) and the
    message ``str(exception)`` would give. No class is imported."""
    if raw is None:
        return RemoteError("taskiq.UnknownError", "the task failed without an error", traceback)
    if not isinstance(raw, dict):
        return RemoteError("taskiq.Error", str(raw)[:10_000], traceback)
    kind, module = raw.get("exc_type"), raw.get("exc_module")
    kind = kind if isinstance(kind, str) and kind else "Exception"
    if isinstance(module, str) and module and module != "builtins":
        kind = f"{module}.{kind}"
    args = raw.get("exc_message")
    if isinstance(args, list | tuple):
        message = "" if not args else str(args[0]) if len(args) == 1 else str(tuple(args))
    else:
        message = "" if args is None else str(args)
    if not traceback and depth < 8:
        # What taskiq keeps of the chain, as text.
        for field, words in (("exc_cause", "caused by"), ("exc_context", "during")):
            inner = raw.get(field)
            if isinstance(inner, dict):
                traceback = f"{words}: {_error_in(inner, '', depth + 1)}"
                break
    return RemoteError(kind, message, traceback)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
