"""Values and pure logic: TaskID, codec, options, the retry decision, the public surface."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import bus
from bus._options import resolve_eta
from bus._worker import decide


def test_task_ids_are_unique_and_time_ordered() -> None:
    ids = [bus.TaskID.new() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert abs(ids[0].timestamp - time.time()) < 5


def test_task_id_parse_validates() -> None:
    tid = bus.TaskID.new()
    assert bus.TaskID.parse(str(tid)) == tid
    assert bus.TaskID.parse(str(tid).upper()) == tid
    assert hash(bus.TaskID.parse(str(tid))) == hash(tid)
    for bad in ["", "nope", str(tid)[:-1], str(tid).replace("-7", "-4"), "x" * 36]:
        with pytest.raises(ValueError, match="not a task id"):
            bus.TaskID.parse(bad)
    with pytest.raises(ValueError, match="string"):
        bus.TaskID.parse(42)  # type: ignore[arg-type]


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(args=st.lists(JSON, max_size=4), kwargs=st.dictionaries(st.text(), JSON, max_size=4))
def test_json_codec_round_trips_messages(args: list[Any], kwargs: dict[str, Any]) -> None:
    codec = bus.JSONCodec()
    msg = bus.TaskMessage(
        task_id=bus.TaskID.new(),
        task_name="t",
        args=tuple(args),
        kwargs=kwargs,
        labels={"l": args},
        attempt=2,
        eta=1.5,
    )
    assert codec.decode_message(codec.encode_message(msg)) == msg


@given(args=st.lists(JSON, max_size=4), name=st.text(min_size=1))
def test_json_codec_writes_a_plain_message_as_its_full_object(args: list[Any], name: str) -> None:
    # The usual message (positional arguments, nothing else) is encoded from a template:
    # the bytes must stay those of the whole object, field for field.
    codec = bus.JSONCodec()
    msg = bus.TaskMessage(bus.TaskID.new(), name, tuple(args), {}, {})
    whole = {"id": msg.task_id, "name": name, "args": args, "kwargs": {}, "labels": {}}
    whole |= {"attempt": 1, "eta": None}
    expected = json.dumps(whole, separators=(",", ":"), ensure_ascii=False).encode()
    assert codec.encode_message(msg) == expected
    assert codec.decode_message(expected) == msg


def test_json_codec_bounds_a_plain_message_as_any_other() -> None:
    codec = bus.JSONCodec(max_depth=8, max_bytes=200)
    tid = bus.TaskID.new()
    deep: Any = 1
    for _ in range(6):  # the message object, its arguments, six lists: 8 levels
        deep = [deep]
    plain = bus.TaskMessage(tid, "t", (deep,), {}, {})
    assert codec.decode_message(codec.encode_message(plain)) == plain
    for msg in [plain, attrs.evolve(plain, attempt=2)]:  # the template, the whole object
        with pytest.raises(ValueError, match="8 levels deep"):
            codec.encode_message(attrs.evolve(msg, args=([deep],)))
        with pytest.raises(ValueError, match="max_bytes=200"):
            codec.encode_message(attrs.evolve(msg, args=("x" * 200,)))
    with pytest.raises(TypeError, match="not JSON serializable"):
        codec.encode_message(attrs.evolve(plain, args=(object(),)))


@given(
    value=JSON,
    status=st.sampled_from(bus.TaskStatus),
    took=st.floats(min_value=0, allow_nan=False, allow_infinity=False),
)
def test_json_codec_writes_a_plain_result_as_its_full_object(
    value: Any, status: bus.TaskStatus, took: float
) -> None:
    # The usual result (no error, no labels) is encoded from a template too.
    codec = bus.JSONCodec()
    result = bus.TaskResult(bus.TaskID.new(), status, value, None, took, {})
    whole = {"id": result.task_id, "status": status.value, "value": value, "error": None}
    whole |= {"time": took, "labels": {}}
    expected = json.dumps(whole, separators=(",", ":"), ensure_ascii=False).encode()
    assert codec.encode_result(result) == expected
    assert codec.decode_result(expected) == result


def test_json_codec_bounds_a_plain_result_as_any_other() -> None:
    codec = bus.JSONCodec(max_depth=8, max_bytes=200)
    deep: Any = 1
    for _ in range(7):  # the result object, then seven lists: 8 levels
        deep = [deep]
    plain = bus.TaskResult(bus.TaskID.new(), bus.TaskStatus.SUCCESS, deep, None, 0.5, {})
    assert codec.decode_result(codec.encode_result(plain)) == plain
    for result in [plain, attrs.evolve(plain, labels={"l": 1})]:  # the template, the whole
        with pytest.raises(ValueError, match="8 levels deep"):
            codec.encode_result(attrs.evolve(result, return_value=[deep]))
        with pytest.raises(ValueError, match="max_bytes=200"):
            codec.encode_result(attrs.evolve(result, return_value="x" * 200))
    with pytest.raises(ValueError, match="Out of range float"):
        codec.encode_result(attrs.evolve(plain, execution_time=math.inf))


def test_json_codec_round_trips_results() -> None:
    codec = bus.JSONCodec()
    err = bus.RemoteError("ValueError", "bad", "Traceback ...")
    for result in [
        bus.TaskResult(bus.TaskID.new(), bus.TaskStatus.SUCCESS, {"a": [1]}, None, 0.5, {"x": 1}),
        bus.TaskResult(bus.TaskID.new(), bus.TaskStatus.FAILURE, None, err, 0.1, {}),
    ]:
        assert codec.decode_result(codec.encode_result(result)) == result


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"name": "t", "args": [], "kwargs": {}}', "'id'"),
        (b'{"id": "nope", "name": "t", "args": [], "kwargs": {}}', "not a task id"),
        (b'{"id": "%s", "name": 5, "args": [], "kwargs": {}}', "'name'"),
        (b'{"id": "%s", "name": "t", "args": {}, "kwargs": {}}', "'args'"),
        (b'{"id": "%s", "name": "t", "args": [], "kwargs": []}', "'kwargs'"),
        (b'{"id": "%s", "name": "t", "args": [], "kwargs": {}, "attempt": 0}', "'attempt'"),
        (b'{"id": "%s", "name": "t", "args": [], "kwargs": {}, "eta": "x"}', "'eta'"),
    ],
)
def test_json_codec_rejects_bad_messages_with_a_reason(data: bytes, why: str) -> None:
    if b"%s" in data:
        data = data % str(bus.TaskID.new()).encode()
    with pytest.raises(bus.DecodeError, match=why):
        bus.JSONCodec().decode_message(data)


def test_task_options_are_validated() -> None:
    broker = bus.InMemoryBroker()
    with pytest.raises(ValueError, match="timeout"):
        broker.task(timeout=-1)
    with pytest.raises(ValueError, match="retries"):
        broker.task(retries=-1)
    with pytest.raises(TypeError, match="retry_on"):
        broker.task(retry_on=("ValueError",))
    with pytest.raises(TypeError, match="unknown task option"):
        broker.task(timeuot=3)
    with pytest.raises(ValueError, match="aware"):
        broker.task(eta=dt.datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="concurrency"):
        bus.InMemoryBroker(concurrency=0)
    with pytest.raises(ValueError, match="max_queue"):
        bus.InMemoryBroker(max_queue=0)
    with pytest.raises(ValueError, match="max_stored_results"):
        bus.InMemoryBroker(max_stored_results=0)


def test_resolve_eta() -> None:
    assert resolve_eta({}) is None
    assert resolve_eta({"delay": 0}) is None
    assert resolve_eta({"delay": 10}) == pytest.approx(time.time() + 10, abs=1)
    when = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert resolve_eta({"eta": when}) == when.timestamp()
    with pytest.raises(ValueError, match="not both"):
        resolve_eta({"delay": 1, "eta": 5})


def test_labels_override_options() -> None:
    opts = bus.TaskOptions(timeout=5, retries=1)
    assert opts.with_labels({"timeout": 1, "other": 2}) == bus.TaskOptions(timeout=1, retries=1)
    assert opts.with_labels({"other": 2}) is opts
    with pytest.raises(ValueError, match="retries"):
        opts.with_labels({"retries": -3})


def _msg(attempt: int = 1) -> bus.TaskMessage:
    return bus.TaskMessage(
        task_id=bus.TaskID.new(), task_name="t", args=(), kwargs={}, labels={}, attempt=attempt
    )


def test_decide_success_is_final() -> None:
    d = decide(_msg(), bus.TaskOptions(retries=3), bus.TaskStatus.SUCCESS, 7, None, 0.1)
    assert d.retry is None and d.result is not None
    assert d.result.return_value == 7 and d.result.status is bus.TaskStatus.SUCCESS


def test_decide_retries_with_exponential_backoff() -> None:
    opts = bus.TaskOptions(retries=3, retry_backoff=2, retry_backoff_max=5)
    delays = []
    for attempt in (1, 2, 3):
        d = decide(_msg(attempt), opts, bus.TaskStatus.FAILURE, None, OSError("x"), 0.1)
        assert d.retry is not None and d.retry.attempt == attempt + 1
        delays.append(d.delay)
    assert delays == [2, 4, 5]
    last = decide(_msg(4), opts, bus.TaskStatus.FAILURE, None, OSError("x"), 0.1)
    assert last.retry is None and last.result is not None
    assert last.result.error is not None and last.result.error.type_name == "OSError"


def test_decide_respects_retry_on_and_never_retries_cancellation() -> None:
    opts = bus.TaskOptions(retries=3, retry_on=(OSError,))
    d = decide(_msg(), opts, bus.TaskStatus.FAILURE, None, KeyError("k"), 0.1)
    assert d.retry is None
    d = decide(_msg(), opts, bus.TaskStatus.CANCELLED, None, None, 0.1)
    assert d.retry is None and d.result is not None
    assert d.result.status is bus.TaskStatus.CANCELLED
    timeouts = bus.TaskOptions(retries=1, retry_on=(TimeoutError,))
    assert decide(_msg(), timeouts, bus.TaskStatus.TIMEOUT, None, None, 1).retry is not None


def test_remote_error_is_plain_text() -> None:
    class Custom(Exception):
        pass

    try:
        raise Custom("boom")
    except Custom as exc:
        err = bus.RemoteError.from_exception(exc)
    assert err.type_name.endswith("test_remote_error_is_plain_text.<locals>.Custom")
    assert err.message == "boom"
    assert "raise Custom" in err.traceback
    assert str(err).endswith("Custom: boom")
    assert attrs.has(bus.RemoteError)


def test_unwrap() -> None:
    tid = bus.TaskID.new()
    assert bus.TaskResult(tid, bus.TaskStatus.SUCCESS, 3).unwrap() == 3
    with pytest.raises(bus.TaskCancelled):
        bus.TaskResult(tid, bus.TaskStatus.CANCELLED).unwrap()
    with pytest.raises(bus.TaskFailed, match="timeout"):
        bus.TaskResult(tid, bus.TaskStatus.TIMEOUT).unwrap()


def test_register_task_names_and_lookup() -> None:
    broker = bus.InMemoryBroker()

    async def f() -> None:
        pass

    task = broker.register_task(f)
    assert task.name == f"{__name__}:test_register_task_names_and_lookup.<locals>.f"
    assert broker.find_task(task.name) is task
    assert broker.find_task("missing") is None
    named = broker.register_task(f, "custom.name", timeout=3)
    assert named.options.timeout == 3
    with pytest.raises(ValueError, match="already registered"):
        broker.register_task(lambda: None, "custom.name")
    with pytest.raises(TypeError, match="callable"):
        broker.register_task(42)  # type: ignore[arg-type]


def test_public_surface_is_pinned() -> None:
    assert sorted(bus.__all__) == sorted(
        [
            "CONTEXT", "AsyncTask", "Broker", "BrokerActor", "BrokerClosed", "BrokerState",
            "BrokerStats", "BrokerUnavailable", "BusError", "BusEvent", "Codec", "Context",
            "Cron", "DecodeError", "Every", "FrozenDict", "InMemoryBroker",
            "InMemoryResultBackend", "InmemoryResultBackend", "JSONCodec", "Kicker", "Limit",
            "Middleware", "QueueFull", "RemoteError", "ResultBackend", "ResultNotFound",
            "ResultTimeout", "ScheduleInfo", "ScheduleSpec", "SendError", "SyncTask", "Task",
            "TaskCancelled", "TaskFailed",
            "TaskHandle", "TaskID", "TaskMessage", "TaskOptions", "TaskResult", "TaskStatus",
            "TickState", "UnknownTaskError", "Worker", "WorkerActor", "__version__", "cron",
            "current_context", "every", "gather", "limit",
            # workflows (issue 19)
            "Chain", "Group", "Signature", "StepStatus", "WorkflowHandle", "WorkflowStatus",
            "chain", "chord", "group",
            # a worker process that drains on signals (issue 21)
            "run_worker_process",
        ]
    )  # fmt: skip
    for name in bus.__all__:
        assert getattr(bus, name) is not None
    assert bus.InmemoryResultBackend is bus.InMemoryResultBackend
    for err in [bus.UnknownTaskError, bus.ResultTimeout, bus.TaskFailed, bus.SendError]:
        assert issubclass(err, bus.BusError)
    assert math.isfinite(bus.TaskOptions().retry_backoff)


def test_a_task_message_is_immutable_all_the_way_down() -> None:
    m = bus.TaskMessage(
        task_id=bus.TaskID.new(),
        task_name="t",
        args=(1, [2, [3]], {"k": [4]}),
        kwargs={"opts": {"deep": [5, {"x": 6}]}},
        labels={"tags": ["a", "b"], "meta": {"n": 1}},
    )
    hash(m)  # every part is hashable
    assert isinstance(m.kwargs, bus.FrozenDict) and isinstance(m.labels, dict)
    with pytest.raises(TypeError, match="read-only"):
        m.kwargs["opts"] = 1  # type: ignore[index]
    with pytest.raises(TypeError, match="read-only"):
        m.labels["meta"]["n"] = 2
    with pytest.raises(TypeError, match="read-only"):
        m.kwargs.update(x=1)
    with pytest.raises(AttributeError):
        m.args[1].append(7)  # lists became tuples (that compare equal to the lists)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        m.task_name = "other"  # type: ignore[misc]
    # Read back, they are the values that were sent.
    assert m.args == (1, [2, [3]], {"k": [4]})
    assert m.labels == {"tags": ["a", "b"], "meta": {"n": 1}}
    assert dict(m.kwargs) == {"opts": {"deep": [5, {"x": 6}]}}
    assert repr(m.labels) == "{'tags': ['a', 'b'], 'meta': {'n': 1}}"


async def test_a_task_gets_its_own_mutable_copy_of_its_arguments() -> None:
    broker = bus.InMemoryBroker()
    seen: list[Any] = []

    @broker.task
    async def mutate(items: list[int], opts: dict[str, Any]) -> list[int]:
        items.append(99)  # its own list
        opts["touched"] = True
        seen.append((type(items), type(opts)))
        return items

    sent = [1, 2]
    with trio.fail_after(5):
        async with broker:
            h1 = await mutate.kiq(sent, {"a": 1})
            h2 = await mutate.kiq(sent, {"a": 1})
            r1, r2 = await bus.gather(h1, h2)
    assert r1.return_value == r2.return_value == [1, 2, 99]
    assert sent == [1, 2]
    assert seen == [(list, dict), (list, dict)]
