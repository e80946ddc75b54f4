"""Deeply immutable values for messages: a read-only dict, and freeze / thaw helpers.

A :class:`TaskMessage` is immutable all the way down: lists become tuples and dicts
become :class:`FrozenDict` when a message is made, so a message can be shared (and
hashed) safely. A worker gives the task function its own mutable copy (``thaw``),
with JSON's shapes: tuples come back as lists, read-only dicts as dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

__all__ = [
    "EMPTY",
    "FrozenDict",
    "FrozenList",
    "freeze",
    "freeze_args",
    "freeze_mapping",
    "json_faithful",
    "value_faithful",
    "thaw",
    "thaw_args",
]

_SCALARS = frozenset({str, int, float, bool, type(None), bytes})


class FrozenDict(dict[str, Any]):
    """A read-only ``dict``: every mutating method raises ``TypeError``, ``hash()``
    works (when the values are hashable). It is still a ``dict`` for readers, JSON
    encoders and ``==``; ``dict(fd)`` or ``fd.copy()`` gives a mutable copy."""

    __slots__ = ("_hash",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hash: int | None = None

    def _readonly(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("this mapping is read-only (a message is immutable); copy it with dict()")

    __setitem__ = _readonly
    __delitem__ = _readonly
    clear = _readonly
    pop = _readonly
    popitem = _readonly
    setdefault = _readonly
    update = _readonly
    __ior__ = _readonly

    def __hash__(self) -> int:  # type: ignore[override]
        h = self._hash
        if h is None:
            h = self._hash = hash(frozenset(self.items()))
        return h

    def copy(self) -> dict[str, Any]:
        return dict(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    # repr is a dict's: labels print as the user wrote them.


class FrozenList(tuple[Any, ...]):
    """A list made immutable: a tuple that compares equal to the list it came from
    (``FrozenList([1, 2]) == [1, 2]``), so labels and arguments read back as the values
    that were sent. JSON encodes it as an array; a worker thaws it back into a list."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = tuple.__hash__

    def __repr__(self) -> str:
        return repr(list(self))


EMPTY = FrozenDict()


def freeze(value: Any) -> Any:
    """``value`` with every list made a tuple and every dict a :class:`FrozenDict`,
    recursively. Other values are returned as they are."""
    t = type(value)
    if t in _SCALARS or t is FrozenDict:
        return value
    if t is list:
        return FrozenList([freeze(v) for v in value])
    if t is tuple or t is FrozenList:
        return t([freeze(v) for v in value])
    if isinstance(value, Mapping):
        return FrozenDict({k: freeze(v) for k, v in value.items()}) if value else EMPTY
    if isinstance(value, list):
        return FrozenList([freeze(v) for v in value])
    if isinstance(value, tuple):
        return tuple([freeze(v) for v in value])
    return value


def _too_deep() -> ValueError:
    return ValueError("a value nested too deeply to travel in a message (see bus._codec.MAX_DEPTH)")


def freeze_args(value: Any) -> tuple[Any, ...]:
    """Positional arguments as a deeply frozen tuple. ``ValueError`` (never
    ``RecursionError``) for a value nested too deeply to freeze."""
    if not value:
        return ()
    for v in value:
        if type(v) not in _SCALARS:
            try:
                return tuple([freeze(v) for v in value])
            except RecursionError:
                raise _too_deep() from None
    return value if type(value) is tuple else tuple(value)


def freeze_mapping(value: Any) -> FrozenDict:
    """A mapping as a deeply frozen :class:`FrozenDict` (``ValueError`` when nested too
    deeply, as :func:`freeze_args`)."""
    if type(value) is FrozenDict:
        return value
    if not value:
        return EMPTY
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a mapping, not {type(value).__name__}")
    try:
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    except RecursionError:
        raise _too_deep() from None


def thaw(value: Any) -> Any:
    """A mutable copy of a frozen value: tuples become lists, dicts become dicts."""
    t = type(value)
    if t in _SCALARS:
        return value
    if t is tuple or t is FrozenList or t is list:
        return [thaw(v) for v in value]
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    return value


def thaw_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Positional arguments with each container thawed (scalars as they are)."""
    for v in args:
        if type(v) not in _SCALARS:
            return tuple([thaw(v) for v in args])
    return args


#: How deep :func:`json_faithful` and :func:`value_faithful` look: a value nested
#: deeper is not taken as faithful (the codec, which bounds depth, then decides).
_FAITHFUL_DEPTH = 32


def json_faithful(value: Any, _depth: int = 0) -> bool:
    """Whether a JSON round trip gives ``value`` back (after :func:`thaw`): scalars and
    tuples of them. Dicts are not (JSON turns their keys into strings)."""
    t = type(value)
    if t in _SCALARS:
        return t is not float or value == value  # NaN never survives the codec
    if (t is tuple or t is FrozenList) and _depth < _FAITHFUL_DEPTH:
        return all(json_faithful(v, _depth + 1) for v in value)
    return False


def value_faithful(value: Any, _depth: int = 0) -> bool:
    """Whether a JSON round trip gives ``value`` back as it is (a task's return value):
    scalars, and lists and str-keyed dicts of them. Tuples are not (they come back as
    lists), nor is NaN."""
    t = type(value)
    if t in _SCALARS:
        return t is not bytes and (t is not float or value == value)
    if _depth >= _FAITHFUL_DEPTH:
        return False
    if t is list:
        return all(value_faithful(v, _depth + 1) for v in value)
    if t is dict:
        return all(type(k) is str and value_faithful(v, _depth + 1) for k, v in value.items())
    return False
