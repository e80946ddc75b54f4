"""Constructors for the frozen values of the hot path, made of their slots' setters.

attrs makes a frozen, slotted class's ``__init__`` set each field through
``object.__setattr__`` (the class's own ``__setattr__`` refuses): a lookup of the
field's name on every field of every value. :func:`maker` writes, as attrs writes its
``__init__``, a function that takes every field positionally and sets each through its
slot's own setter, which the class hands out once: the same value, about a third
cheaper to make (measured on ``Send``, ``Delivery``, ``TaskResult``). A ``kiq`` makes a
handful of these values, so it counts there; everywhere else the classes are called as
usual.

Only for classes whose fields have no converter, validator or ``on_setattr`` and that
have no ``__attrs_post_init__`` (``maker`` refuses others): their ``__init__`` does
nothing but set the fields, so the two ways make equal values (tests/logic/test_make.py
checks it for each class made so).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs

__all__ = ["maker"]

T = TypeVar("T")


def maker(cls: type[T], *, converted: bool = False) -> Callable[..., T]:
    """A function ``make(*fields)`` that returns what ``cls(*fields)`` returns, every
    field given positionally, in the class's order. ``TypeError`` for a class this
    cannot make (see the module documentation).

    ``converted=True`` allows fields with converters: the caller then passes values
    the converters would give back as they are (say, a message's arguments already
    frozen), and they are not called."""
    fields = attrs.fields(cls)  # type: ignore[arg-type]
    if hasattr(cls, "__attrs_post_init__") or not getattr(cls, "__slots__", None):
        raise TypeError(f"{cls.__qualname__}: only slotted classes without post-init")
    for f in fields:
        hooks = f.validator is not None or (f.converter is not None and not converted)
        if hooks or f.on_setattr not in (None, attrs.setters.NO_OP):
            raise TypeError(f"{cls.__qualname__}.{f.name}: a converter, validator or hook")
    names = [f"f{i}" for i in range(len(fields))]
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    lines = [f"def make({', '.join(names)}):", "    o = _new(_cls)"]
    for i, f in enumerate(fields):
        namespace[f"_set{i}"] = getattr(cls, f.name).__set__
        lines.append(f"    _set{i}(o, f{i})")
    lines.append("    return o")
    exec("\n".join(lines), namespace)  # our own text, as attrs writes its __init__
    make: Callable[..., T] = namespace["make"]
    make.__qualname__ = make.__name__ = f"make_{cls.__name__}"
    return make
