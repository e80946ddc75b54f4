"""Task identifiers: time-ordered, unique, and cheap to make."""

from __future__ import annotations

import math
import random
import re
import time
from typing import Any

__all__ = ["TaskID"]

_getrandbits = random.getrandbits
_time_ns = time.time_ns
_VARIANT = 0x8000_0000_0000_0000  # the RFC 9562 variant bits, 10 in the top two
_LOW48 = 0xFFFF_FFFF_FFFF
_str_new = str.__new__
#: What ``TaskID.new`` last used: [the millisecond, the counter within it, the text of
#: the millisecond up to the version digit]. Module state, not class attributes: a
#: write to a class attribute costs more, and makes Python forget what it learned
#: about the class (its attribute caches), on every id.
_clock: list[Any] = [0, 0, ""]
_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z")
#: Any RFC 9562 UUID (versions 1 to 8), canonical or as 32 hex digits (taskiq's
#: ``uuid4().hex``): what ``TaskID.parse(text, any_uuid=True)`` also accepts.
_ANY_UUID = re.compile(
    r"(?:[0-9a-f]{8}-[0-9a-f]{4}-[1-8][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    r"|[0-9a-f]{12}[1-8][0-9a-f]{3}[89ab][0-9a-f]{15})\Z"
)


class TaskID(str):
    """A task's identity: a UUIDv7 in canonical text form.

    It is a ``str`` subclass, so it hashes, compares and serialises as its text, and
    is immutable. Ids made by :meth:`new` in one process sort in creation order (the
    first 48 bits are the Unix time in milliseconds, the next 12 bits a counter within
    that millisecond), the remaining 62 bits are random.
    """

    __slots__ = ()

    @classmethod
    def new(cls) -> TaskID:
        """A fresh, unique id that sorts after every id this process made before."""
        ms = _time_ns() // 1_000_000
        clock = _clock
        if ms > clock[0]:
            clock[0] = ms
            seq = clock[1] = 0
            clock[2] = _prefix(ms)
        else:
            # Same (or a backwards-stepped) millisecond: keep order with the counter,
            # borrowing the next millisecond if the counter runs out.
            seq = clock[1] = clock[1] + 1
            if seq > 0xFFF:
                clock[0] += 1
                seq = clock[1] = 0
                clock[2] = _prefix(clock[0])
        # The module-level generator is seeded from the OS and re-seeded in forked
        # children, so ids stay unique across processes; it is ~10x cheaper than urandom.
        r = _getrandbits(62) | _VARIANT
        # (%-formatting: measured faster here than an f-string with format specs)
        text = "%s%03x-%04x-%012x" % (clock[2], seq, r >> 48, r & _LOW48)  # noqa: UP031
        return _str_new(cls, text)

    @classmethod
    def parse(cls, text: str, *, any_uuid: bool = False) -> TaskID:
        """Validate ``text`` as a task id (lower- or upper-case UUIDv7).

        ``any_uuid=True`` also accepts any other UUID (versions 1 to 8), in canonical
        form or as 32 hex digits: the ids another system made, such as taskiq's
        ``uuid4().hex`` (a codec of that system's wire format passes it; the bus's own
        inputs stay UUIDv7 only). Such an id is kept as written (lower-cased), so its
        keys are the other system's; it has no :attr:`timestamp`.

        Raises :class:`ValueError` naming the text when it is not one.
        """
        if isinstance(text, TaskID):
            return text
        if not isinstance(text, str):
            raise ValueError(f"a task id is a string, not {type(text).__name__}")
        low = text.lower()
        if not _PATTERN.match(low) and not (any_uuid and _ANY_UUID.match(low)):
            what = "a UUID" if any_uuid else "a UUIDv7"
            raise ValueError(f"not a task id ({what} such as {EXAMPLE}): {text[:80]!r}")
        return str.__new__(cls, low)

    def __repr__(self) -> str:
        return f"TaskID({str.__repr__(self)})"

    @property
    def timestamp(self) -> float:
        """The Unix time (seconds) at which :meth:`new` made this id; NaN for an id
        that is not a UUIDv7 (one parsed with ``any_uuid=True``)."""
        if len(self) != 36 or self[14] != "7":
            return math.nan
        return int(self[:8] + self[9:13], 16) / 1000.0


def _prefix(ms: int) -> str:
    """The first 15 characters of an id made in millisecond ``ms``."""
    h = f"{ms:012x}"
    return f"{h[:8]}-{h[8:]}-7"


EXAMPLE = "0190a6f2-3b1c-7d4e-8f00-123456789abc"
