"""RESP2 on the wire: the client's exceptions, command encoding, and the reply parser.

Encoding is done by hand (one ``bytes.join`` per command); parsing is hiredis's
:class:`hiredis.Reader`, which returns an error reply as an *instance* of the class it
is given (here :class:`ReplyError`) rather than raising it, also inside arrays (the
replies of ``EXEC``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

import hiredis

__all__ = [
    "MORE",
    "Arg",
    "Command",
    "ConnectionLost",
    "Head",
    "Packed",
    "RedisError",
    "RedisTimeout",
    "Reply",
    "ReplyError",
    "ReplyTooLarge",
    "encode",
    "encode_many",
    "new_reader",
]

#: What a command's arguments may be. ``bool`` is refused: say ``1``/``0`` or ``"true"``.
Arg: TypeAlias = bytes | str | int | float | bytearray | memoryview
Command: TypeAlias = Sequence[Arg]
#: A reply: ``bytes`` (bulk and status strings), ``int``, ``None``, a ``list`` of
#: replies, or a :class:`ReplyError` where errors are returned in place.
Reply: TypeAlias = Any


class RedisError(Exception):
    """Root of every error the client raises."""


class ReplyError(RedisError):
    """The server answered with an error reply.

    ``message`` is the server's text (``"WRONGTYPE Operation against a key ..."``),
    ``code`` its first word (``"WRONGTYPE"``, ``"NOSCRIPT"``, ``"BUSYGROUP"``, ...)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = message.split(" ", 1)[0]


class ConnectionLost(RedisError, ConnectionError):
    """The connection is gone (or could not be made): the server closed it, it was
    reset or killed, a reply timed out and the connection was dropped, or it was
    closed by :meth:`aclose`. A command in flight when it broke fails with this, and
    every later command on that connection raises it at once."""


class ReplyTooLarge(ConnectionLost):
    """The connection was dropped because a reply was larger than the URL's
    ``max_reply_bytes`` (the client does not buffer more): a :class:`ConnectionLost`,
    so callers retry as after any loss; a reader can ask for fewer entries at once."""


class RedisTimeout(RedisError, TimeoutError):
    """A command got no reply within its timeout (or a connect did not complete in
    ``connect_timeout``). The connection was dropped: the reply can no longer be
    matched to its command."""


class _ProtocolError(Exception):
    """hiredis found bytes that are not RESP (wrapped into ConnectionLost)."""


#: Arguments at least this long are joined into the command without an extra copy.
_BIG = 16384

#: hiredis's "no complete reply buffered yet" marker.
MORE: Any = object()


def new_reader() -> hiredis.Reader:
    return hiredis.Reader(protocolError=_ProtocolError, replyError=ReplyError, notEnoughData=MORE)


def _bulk(arg: Arg) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bool):
        raise TypeError(f"a Redis argument cannot be a bool ({arg!r}): pass 1/0 or a string")
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    if isinstance(arg, bytearray | memoryview):
        return bytes(arg)
    raise TypeError(f"a Redis argument must be bytes, str, int or float, not {type(arg).__name__}")


def _encode(args: Iterable[Arg]) -> bytes:
    """One command as RESP (an array of bulk strings), in Python."""
    parts = [b""]
    count = 0
    for arg in args:
        data = arg if type(arg) is bytes else _bulk(arg)
        count += 1
        if len(data) < _BIG:
            parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
        else:  # not copied twice
            parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    if not count:
        raise ValueError("a Redis command needs at least its name")
    parts[0] = b"*%d\r\n" % count
    return b"".join(parts)


#: hiredis's encoder (typed loosely here: it checks its arguments itself).
_pack: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command


class Packed(tuple[Arg, ...]):
    """A command whose RESP was made with it (by :meth:`Head.command`): still the
    tuple of its arguments for whoever reads them (a cluster routes it by its key),
    and :func:`encode` gives :attr:`resp` without packing the arguments again."""

    resp: bytes


class Head:
    """The first arguments of a command sent again and again with other last ones
    (the producer's ``XADD stream MAXLEN ~ n * field``), packed once:
    :meth:`command` packs only the last arguments. On a send's hot path that is a
    prefix and one format instead of ``pack_command`` over every argument."""

    __slots__ = ("_prefixes", "args", "key")

    def __init__(self, name: bytes, key: bytes, *args: Arg) -> None:
        self.args: tuple[Arg, ...] = (name, key, *args)
        #: The key it writes (its first argument after its name).
        self.key = key
        #: The packed head, by how many arguments follow it (the array's length).
        self._prefixes: dict[int, bytes] = {}

    def _prefix(self, tail: int) -> bytes:
        prefix = self._prefixes.get(tail)
        if prefix is None:
            packed = _encode((*self.args, b""))  # the head's bulks, then an empty one
            bulks = packed[packed.index(b"\r\n") + 2 : -len(b"$0\r\n\r\n")]
            prefix = self._prefixes[tail] = b"*%d\r\n%b" % (len(self.args) + tail, bulks)
        return prefix

    def command(self, *tail: bytes) -> Packed:
        """The command: the head, then ``tail`` (bytes), with its RESP."""
        command = Packed((*self.args, *tail))
        parts = [self._prefix(len(tail))]
        for arg in tail:
            parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
        command.resp = b"".join(parts)
        return command

    def command1(self, last: bytes) -> Packed:
        """:meth:`command` with one last argument (the usual send: its message)."""
        if len(last) >= _BIG:
            return self.command(last)
        command = Packed((*self.args, last))
        command.resp = b"%b$%d\r\n%b\r\n" % (self._prefix(1), len(last), last)
        return command


def encode(args: Iterable[Arg]) -> bytes:
    """One command as RESP (an array of bulk strings): by hiredis's ``pack_command``
    (in C, about twice as fast) when it takes the arguments (bytes, str, int, float,
    memoryview), else in Python (a bytearray; a bool or another type raises its
    TypeError, an empty command ValueError). A :class:`Packed` command comes packed."""
    if type(args) is Packed:
        return args.resp
    command = args if type(args) is tuple else tuple(args)
    if command:
        try:
            return _pack(command)
        except TypeError:
            pass
    return _encode(command)


def encode_many(commands: Iterable[Command]) -> tuple[bytes, int]:
    """Several commands as one buffer, and how many they are."""
    if type(commands) is tuple and len(commands) == 1:  # (a lone send: no list, no join)
        return encode(commands[0]), 1
    chunks = [encode(command) for command in commands]
    return b"".join(chunks), len(chunks)
