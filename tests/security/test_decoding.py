"""Decoding raises DecodeError and nothing else, whatever the bytes (issue 18, item 3).

Depth and size are capped before the JSON is parsed; what the decoder refuses, the
encoder refuses to write.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bus
from bus._codec import MAX_DEPTH, too_deep
from bus._frozen import freeze_args, json_faithful, value_faithful

CODEC = bus.JSONCodec()
TID = str(bus.TaskID.new())


def _message(args: str, **extra: str) -> bytes:
    fields = {"id": f'"{TID}"', "name": '"t"', "args": args, "kwargs": "{}", **extra}
    return ("{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}").encode()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [65, 500, 900, 997, 5000, 200_000])
def test_deeply_nested_json_is_a_decode_error(depth: int) -> None:
    # 500-997 levels parsed, then freeze() raised RecursionError (not a DecodeError).
    with pytest.raises(bus.DecodeError, match="nested more than 64 levels"):
        CODEC.decode_message(_message(_nested(depth)))
    result = b'{"id":"%s","status":"success","value":%s}' % (
        str(bus.TaskID.new()).encode(),
        _nested(depth).encode(),
    )
    with pytest.raises(bus.DecodeError, match="nested"):
        CODEC.decode_result(result)


def test_depth_is_counted_from_the_message_and_brackets_in_strings_do_not_count() -> None:
    # The message object and its args list are two of the 64 levels.
    ok = CODEC.decode_message(_message("[" + _nested(MAX_DEPTH - 2) + "]"))
    assert len(ok.args) == 1
    with pytest.raises(bus.DecodeError, match="nested"):
        CODEC.decode_message(_message("[" + _nested(MAX_DEPTH - 1) + "]"))
    text = json.dumps(["[" * 1000 + '\\"{' * 500, {"k": "]" * 10}])
    assert CODEC.decode_message(_message(text)).args[0].startswith("[[[")
    assert not too_deep(json.dumps({"a": "[" * 100}))
    assert too_deep("[" * 65 + "]" * 65)
    assert not too_deep("[" * 64 + "]" * 64)


def test_size_is_capped_before_parsing() -> None:
    small = bus.JSONCodec(max_bytes=1000)
    with pytest.raises(bus.DecodeError, match="max_bytes=1000"):
        small.decode_message(_message(json.dumps(["x" * 2000])))
    with pytest.raises(bus.DecodeError, match="max_bytes"):
        small.decode_result(b" " * 1001)
    msg = bus.TaskMessage(
        task_id=bus.TaskID.new(), task_name="t", args=("x" * 2000,), kwargs={}, labels={}
    )
    with pytest.raises(ValueError, match="max_bytes"):
        small.encode_message(msg)
    with pytest.raises(ValueError, match="max_depth"):
        bus.JSONCodec(max_depth=10_000)


@pytest.mark.parametrize(
    ("args", "extra", "why"),
    [
        ("[NaN]", {}, "not JSON"),
        ("[Infinity]", {}, "not JSON"),
        ("[-Infinity]", {}, "not JSON"),
        ("[" + "9" * 5000 + "]", {}, "not JSON"),  # int() refuses 4300+ digits
        ("[]", {"eta": "1e400"}, "'eta'"),  # parses as inf
        ("[]", {"eta": "-1e400"}, "'eta'"),
        ("[]", {"eta": "1e300"}, "'eta'"),
        ("[]", {"eta": "1" + "0" * 400}, "'eta'"),  # an int no float can hold
        ("[]", {"attempt": "1e3"}, "'attempt'"),
        ("[]", {"attempt": "1002"}, "'attempt'"),
        ("[]", {"attempt": "9" * 100}, "'attempt'"),
        ("[]", {"labels": "[]"}, "'labels'"),
        ("[]", {"priority": "10"}, "'priority'"),
        ("[]", {"queue": '"a b"'}, "'queue'"),
    ],
)
def test_hostile_fields_are_decode_errors(args: str, extra: dict[str, str], why: str) -> None:
    with pytest.raises(bus.DecodeError, match=why):
        CODEC.decode_message(_message(args, **extra))


@pytest.mark.parametrize(
    "data",
    [
        b'{"id":"%s","status":"success","error":{"a":1}}',
        b'{"id":"%s","status":"failure","error":[1]}',
        b'{"id":"%s","status":"success","time":"soon"}',
        b'{"id":"%s","status":"success","time":1e400,"value":NaN}',
        b'{"id":"%s","status":"success","labels":[1,2]}',
        b'{"id":"%s","status":"nope"}',
        b'{"id":5,"status":"success"}',
    ],
)
def test_hostile_results_are_decode_errors(data: bytes) -> None:
    if b"%s" in data:
        data = data % str(bus.TaskID.new()).encode()
    with pytest.raises(bus.DecodeError):
        CODEC.decode_result(data)


def _json_values() -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
        max_leaves=20,
    )


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(lambda v: json.dumps(v).encode(), _json_values()),
        st.builds(
            lambda v, depth: _message(
                "[" * depth + json.dumps(v) + "]" * depth, labels=json.dumps({"x": v})
            ),
            _json_values(),
            st.integers(0, 1200),
        ),
    )
)
def test_decoding_raises_decode_error_and_nothing_else(data: bytes) -> None:
    for decode in (CODEC.decode_message, CODEC.decode_result):
        with contextlib.suppress(bus.DecodeError):
            decode(data)


def test_what_cannot_be_decoded_is_not_sent() -> None:
    deep: Any = []
    for _ in range(MAX_DEPTH):
        deep = [deep]
    msg = bus.TaskMessage(
        task_id=bus.TaskID.new(), task_name="t", args=(deep,), kwargs={}, labels={}
    )
    with pytest.raises(ValueError, match="max_depth"):
        CODEC.encode_message(msg)
    # Deeper than Python's recursion: a ValueError, not a RecursionError.
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValueError, match="nested too deeply"):
        freeze_args((deep,))
    assert not json_faithful(tuple(deep)) and not value_faithful(deep)


async def test_kiq_of_too_deep_arguments_raises_send_error() -> None:
    broker = bus.InMemoryBroker()

    @broker.task(name="deep.echo")
    async def echo(value: Any) -> Any:
        return value

    @broker.task(name="deep.build")
    async def build(depth: int) -> Any:
        out: Any = []
        for _ in range(depth):
            out = [out]
        return out

    deep: Any = ["bottom"]
    for _ in range(MAX_DEPTH):
        deep = [deep]
    with trio.fail_after(10):
        async with broker:
            with pytest.raises(bus.SendError, match="max_depth"):
                await echo.kiq(deep)
            # A value a little less deep travels, and so does its result.
            shallow = deep
            for _ in range(4):
                shallow = shallow[0]
            result = await (await echo.kiq(shallow)).wait_result(timeout=5)
            assert result.return_value == shallow
            # A result too deep to store is a FAILURE, not a crash.
            result = await (await build.kiq(100)).wait_result(timeout=5)
            assert result.status is bus.TaskStatus.FAILURE
            assert result.error is not None and "max_depth" in result.error.message
            assert (await (await build.kiq(3)).wait_result(timeout=5)).return_value == [[[[]]]]


@pytest.mark.parametrize("data", [b"[" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000])
def test_a_stored_schedule_nested_too_deep_is_a_value_error(data: bytes) -> None:
    # A run-time schedule is read from Redis: json.loads raised RecursionError on it.
    from bus._schedule import ScheduleSpec

    with pytest.raises(ValueError, match="nested more than 64 levels"):
        ScheduleSpec.from_json(data)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


_TRICKY = st.text(alphabet='[]{}"\\\\ab\u00e9\u2603', max_size=6)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.integers() | _TRICKY,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TRICKY, inner, max_size=3),
        max_leaves=30,
    ),
    st.integers(0, 6),
    st.booleans(),
)
def test_the_depth_scan_agrees_with_the_parsed_depth(value: Any, limit: int, ascii: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii)
    assert too_deep(text, limit) == (_depth(value) > limit)
    assert too_deep(text.encode(), limit) == (_depth(value) > limit)
