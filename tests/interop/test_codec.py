"""TaskiqCodec against taskiq's own models: what taskiq writes, the codec reads, and
what the codec writes, taskiq reads (pydantic validation, label parsing, errors)."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pytest

import bus
from bus.interop.taskiq import LABEL_TYPES, TaskiqCodec

taskiq = pytest.importorskip("taskiq")

from taskiq.labels import LabelType, prepare_label  # noqa: E402
from taskiq.message import TaskiqMessage  # noqa: E402
from taskiq.result import TaskiqResult  # noqa: E402
from taskiq.serializers import JSONSerializer  # noqa: E402

codec = TaskiqCodec()


def taskiq_message_bytes(**labels: Any) -> tuple[str, bytes]:
    """A message as a taskiq producer (the default ProxyFormatter, JSONSerializer) writes it."""
    tid = uuid.uuid4().hex
    values, types = {}, {}
    for k, v in labels.items():
        values[k], types[k] = prepare_label(v)
    msg = TaskiqMessage(
        task_id=tid, task_name="mod:add", labels=values, labels_types=types,
        args=[1, [2, 3]], kwargs={"x": {"y": None}},
    )  # fmt: skip
    return tid, JSONSerializer().dumpb(msg.model_dump(mode="json"))


def test_label_types_are_taskiqs() -> None:
    taskiqs = {t.name: t.value for t in LabelType}
    assert taskiqs == LABEL_TYPES


def test_reads_a_taskiq_message() -> None:
    tid, data = taskiq_message_bytes(
        custom="x", n=5, ratio=0.25, flag=True, off=False, timeout=7, blob=b"\x00\x01"
    )
    m = codec.decode_message(data)
    assert m.task_id == tid and str(m.task_id) == tid  # uuid4 hex, kept as written
    assert m.task_name == "mod:add"
    assert m.args == (1, (2, 3)) and m.kwargs == {"x": {"y": None}}
    assert m.labels["custom"] == "x" and m.labels["n"] == 5 and m.labels["ratio"] == 0.25
    assert m.labels["flag"] is True and m.labels["off"] is False
    assert m.labels["timeout"] == 7  # the bus's own option, same name
    assert m.labels["blob"] == "AAE="  # bytes stay base64 text
    assert m.attempt == 1 and m.priority == 0 and m.queue is None and m.eta is None
    assert math.isnan(m.task_id.timestamp)


def test_option_labels_map() -> None:
    _, data = taskiq_message_bytes(
        retry_on_error=True, max_retries=4, _retries=2, priority=7, queue_name="fast"
    )
    m = codec.decode_message(data)
    assert m.labels["retries"] == 3  # taskiq runs a task at most max_retries times
    assert m.attempt == 3  # two retries sent before this one
    assert m.priority == 7 and m.queue == "fast"
    _, data = taskiq_message_bytes(retry_on_error=True)
    assert codec.decode_message(data).labels["retries"] == 2  # taskiq's default: 3 runs
    _, data = taskiq_message_bytes(retry_on_error=False)
    assert codec.decode_message(data).labels["retries"] == 0
    _, data = taskiq_message_bytes(priority=200)  # not a level of ours: a label only
    m = codec.decode_message(data)
    assert m.priority == 0 and m.labels["priority"] == 200


def test_taskiq_reads_what_the_codec_writes() -> None:
    m = bus.TaskMessage(
        task_id=bus.TaskID.new(), task_name="mod:add", args=(1, "two"), kwargs={"k": [1]},
        labels={"retries": 2, "timeout": 1.5, "note": "hi", "on": True, "none": None,
                "nested": {"a": [1, 2]}},
        attempt=2, queue="fast", priority=3,
    )  # fmt: skip
    data = codec.encode_message(m)
    t = TaskiqMessage.model_validate(JSONSerializer().loadb(data))
    t.parse_labels()
    assert t.task_id == str(m.task_id) and t.task_name == "mod:add"
    assert t.args == [1, "two"] and t.kwargs == {"k": [1]}
    assert t.labels["retry_on_error"] is True and t.labels["max_retries"] == 3
    assert t.labels["_retries"] == 1 and t.labels["timeout"] == 1.5
    assert t.labels["queue_name"] == "fast" and t.labels["priority"] == 3
    assert t.labels["note"] == "hi" and t.labels["on"] is True
    assert t.labels["none"] is None and t.labels["nested"] == {"a": [1, 2]}
    back = codec.decode_message(data)
    assert back == m.__class__(
        task_id=m.task_id, task_name=m.task_name, args=m.args, kwargs=m.kwargs,
        labels={**m.labels, "retry_on_error": True, "max_retries": 3, "_retries": 1,
                "queue_name": "fast", "priority": 3},
        attempt=2, queue="fast", priority=3,
    )  # fmt: skip


def test_reads_a_taskiq_error_without_importing_it() -> None:
    class Secret(Exception):
        pass

    for exc, name, text in [
        (ValueError("bad", 1), "ValueError", "('bad', 1)"),
        (KeyError("k"), "KeyError", "k"),
        (Secret("no"), f"{__name__}.{Secret.__qualname__}", "no"),
    ]:
        result = TaskiqResult(is_err=True, return_value=None, execution_time=0.5, error=exc)
        data = JSONSerializer().dumpb(result.model_dump(mode="json"))
        tid = uuid.uuid4().hex
        r = codec.decode_result(data, task_id=tid)
        assert r.task_id == tid and r.status is bus.TaskStatus.FAILURE and r.is_err
        assert r.error is not None and r.error.type_name == name and r.error.message == text
        assert r.execution_time == 0.5
    # A module and type that would be dangerous to look up stay names.
    error = {"exc_type": "system", "exc_module": "os", "exc_message": ["rm -rf /"]}
    evil = {"is_err": True, "return_value": None, "execution_time": 0, "error": error}
    r = codec.decode_result(json.dumps(evil).encode(), task_id=uuid.uuid4().hex)
    assert r.error == bus.RemoteError("os.system", "rm -rf /")


def test_taskiq_reads_the_codecs_results() -> None:
    tid = bus.TaskID.new()
    ok = bus.TaskResult(tid, bus.TaskStatus.SUCCESS, {"sum": 3}, None, 0.25, {"a": 1})
    t = TaskiqResult.model_validate(JSONSerializer().loadb(codec.encode_result(ok)))
    assert not t.is_err and t.return_value == {"sum": 3} and t.execution_time == 0.25
    assert t.labels == {"a": 1} and t.error is None
    assert codec.decode_result(codec.encode_result(ok)) == ok
    err = bus.RemoteError("ValueError", "bad", "Traceback ...")
    failed = bus.TaskResult(tid, bus.TaskStatus.FAILURE, None, err, 0.0, {})
    t = TaskiqResult.model_validate(JSONSerializer().loadb(codec.encode_result(failed)))
    assert t.is_err and isinstance(t.error, ValueError) and t.error.args == ("bad",)
    assert codec.decode_result(codec.encode_result(failed)) == failed
    cancelled = bus.TaskResult(
        tid, bus.TaskStatus.CANCELLED, None, bus.RemoteError("bus.Cancelled", "stop"), 0.0, {}
    )
    t = TaskiqResult.model_validate(JSONSerializer().loadb(codec.encode_result(cancelled)))
    assert t.is_err and type(t.error).__name__ == "Cancelled"  # a class taskiq made
    assert codec.decode_result(codec.encode_result(cancelled)) == cancelled


def _bad(**fields: Any) -> bytes:
    obj = {"task_id": uuid.uuid4().hex, "task_name": "a", "args": [], "kwargs": {}, **fields}
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"[]", "expected a JSON object"),
        (b"{", "not JSON"),
        (_bad(task_id="order-42"), "not a task id"),
        (_bad(task_name=""), "task_name"),
        (_bad(args={}), "'args'"),
        (_bad(labels={"n": "x"}, labels_types={"n": 2}), "label 'n'"),
        (_bad(labels={"n": "1"}, labels_types={"n": 99}), "unknown type"),
        (_bad(labels={"n": "NaN"}, labels_types={"n": 4}), "label 'n'"),
        (_bad(labels={"_retries": "-1"}, labels_types={"_retries": 2}), "_retries"),
        (_bad(labels={"queue_name": "a b"}), "queue_name"),
        (b"[" * 100 + b"]" * 100, "levels deep"),
    ],
)
def test_refuses_with_decode_error(data: bytes, why: str) -> None:
    with pytest.raises(bus.DecodeError, match=why):
        codec.decode_message(data)


def test_a_result_needs_its_task_id() -> None:
    data = b'{"is_err": false, "return_value": 1, "execution_time": 0}'
    with pytest.raises(bus.DecodeError, match="names no task"):
        codec.decode_result(data)
    other = bus.TaskResult(bus.TaskID.new(), bus.TaskStatus.SUCCESS, 1)
    with pytest.raises(bus.DecodeError, match="that of task"):
        codec.decode_result(codec.encode_result(other), task_id=str(bus.TaskID.new()))


def test_task_id_parse_stays_strict() -> None:
    hex_id = uuid.uuid4().hex
    with pytest.raises(ValueError, match="UUIDv7"):
        bus.TaskID.parse(hex_id)
    assert bus.TaskID.parse(hex_id.upper(), any_uuid=True) == hex_id
    assert bus.TaskID.parse(str(uuid.uuid4()), any_uuid=True)
    for bad in ("order-42", hex_id[:-1], hex_id + "0", "0" * 32):
        with pytest.raises(ValueError, match="not a task id"):
            bus.TaskID.parse(bad, any_uuid=True)


def test_public_surface_is_pinned() -> None:
    import bus.interop.taskiq as interop

    assert sorted(interop.__all__) == sorted(
        [
            "DEAD_LETTER_TASK", "LABEL_TYPES", "TaskiqCodec", "TaskiqKeys",
            "TaskiqRedisBroker", "TaskiqRedisResultBackend", "dead_letter_unknown_tasks",
        ]
    )  # fmt: skip
    typed: bus.Codec = codec  # a bus.Codec (mypy checks the protocol)
    assert typed is codec
