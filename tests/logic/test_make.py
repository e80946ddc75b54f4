"""bus._make: the hot path's constructors make the values the classes make."""

from __future__ import annotations

import attrs
import pytest

from bus._frozen import EMPTY, FrozenList, freeze_args, freeze_mapping
from bus._ids import TaskID
from bus._make import maker
from bus._message import TaskMessage, TaskResult, TaskStatus
from bus._protocol import Ack, Delivery, Send, StoreResult


def _same(a: object, b: object) -> None:
    assert type(a) is type(b)  # and every field the very same object:
    for f in attrs.fields(type(a)):  # type: ignore[misc]
        assert getattr(a, f.name) is getattr(b, f.name), f.name


def test_each_maker_of_the_hot_path_makes_what_its_class_makes() -> None:
    tid = TaskID.new()
    message = TaskMessage(tid, "t", (1,), {}, {})
    result: TaskResult[int] = TaskResult(tid, TaskStatus.SUCCESS, 3, None, 0.5, EMPTY)
    delivery = Delivery(b"", (tid, True, None), message, 1)
    for cls, fields in [
        (Send, (message, None, True, True)),
        (Delivery, (b"x", (tid, False, "k"), None, 2)),
        (Ack, (delivery,)),
        (StoreResult, (tid, result)),
        (TaskResult, (tid, TaskStatus.FAILURE, None, None, 1.5, {"a": 1})),
    ]:
        _same(maker(cls)(*fields), cls(*fields))


def test_a_message_made_with_its_converters_work_done_is_the_same_message() -> None:
    make = maker(TaskMessage, converted=True)
    tid = TaskID.new()
    for args, kwargs in [((), {}), ((1, "a", None), {}), (([1, [2]], {"k": [3]}), {"x": [4]})]:
        made = make(
            tid, "t", freeze_args(args), freeze_mapping(kwargs) if kwargs else EMPTY, EMPTY,
            1, None, None, 0,
        )  # fmt: skip
        plain = TaskMessage(tid, "t", args, kwargs, {})
        assert made == plain and hash(made) == hash(plain)
        assert type(made.args) is tuple and type(made.kwargs) is type(plain.kwargs)
    assert isinstance(
        make(tid, "t", freeze_args(([1],)), EMPTY, EMPTY, 1, None, None, 0).args[0], FrozenList
    )


def test_a_class_with_hooks_is_refused() -> None:
    with pytest.raises(TypeError, match="converter"):
        maker(TaskMessage)

    @attrs.frozen
    class Checked:
        x: int = attrs.field(validator=attrs.validators.instance_of(int))

    with pytest.raises(TypeError, match="validator"):
        maker(Checked)

    @attrs.frozen
    class After:
        x: int

        def __attrs_post_init__(self) -> None:
            pass

    with pytest.raises(TypeError, match="post-init"):
        maker(After)

    @attrs.define(frozen=True, slots=False)
    class Loose:
        x: int

    with pytest.raises(TypeError, match="slotted"):
        maker(Loose)
