"""Redis Cluster routing, sans I/O but for the map: which slot a key and a command
are in (CRC16 of the ``{hash tag}``), which commands have no key or several, and
the slot map read from ``CLUSTER SLOTS`` (:func:`read_map`). Used by
:class:`~bus.redis._cluster.ClusterConnection` and by the schedules (a tick that
crosses slots)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from bus.redis._client import Arg, ConnectionLost, RedisError, ReplyError, _open_one
from bus.redis._sentinel import ask_once
from bus.redis._url import RedisURL

__all__ = ["Addr", "command_slot", "key_slot", "read_map"]

SLOTS: Final = 16384

Addr = tuple[str, int]


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_TABLE: Final = _crc16_table()
_SLOT_CACHE: dict[bytes, int] = {}


def _bytes(arg: Arg) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, (bytearray, memoryview)):
        return bytes(arg)
    return str(arg).encode()


def key_slot(key: Arg) -> int:
    """The cluster slot of ``key``: CRC16 of its ``{hash tag}`` if it has a non-empty
    one, else of the whole key, modulo 16384."""
    data = _bytes(key)
    slot = _SLOT_CACHE.get(data)
    if slot is not None:
        return slot
    part = data
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            part = data[start + 1 : end]
    crc = 0
    for byte in part:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    slot = crc % SLOTS
    if len(_SLOT_CACHE) > 20_000:  # result keys are many and used once
        _SLOT_CACHE.clear()
    _SLOT_CACHE[data] = slot
    return slot


_NO_KEY: Final = frozenset(
    {
        "PING", "INFO", "TIME", "ECHO", "ROLE", "CLUSTER", "CLIENT", "SCRIPT", "PUBLISH",
        "SCAN", "DBSIZE", "WAIT", "MULTI", "EXEC", "DISCARD", "CONFIG", "ASKING",
        "READONLY", "FLUSHALL", "FLUSHDB", "DEBUG", "MEMORY", "COMMAND", "LASTSAVE",
    }
)  # fmt: skip
_SCRIPTS: Final = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})
_MULTI_KEY: Final = frozenset({"MGET", "DEL", "UNLINK", "EXISTS", "TOUCH"})
_RETRY: Final = frozenset({"MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"})


def _name(command: Sequence[Arg]) -> str:
    return _bytes(command[0]).decode("ascii", "replace").upper()


def _streams_at(command: Sequence[Arg]) -> int:
    for i, arg in enumerate(command):
        if _bytes(arg).upper() == b"STREAMS":
            return i + 1
    return len(command)


def command_slot(command: Sequence[Arg]) -> int | None:
    """The slot a command's (first) key is in; ``None`` for a command without a key."""
    name = _name(command)
    if name in _SCRIPTS:
        return key_slot(command[3]) if len(command) > 3 and int(command[2]) > 0 else None
    if name in ("XREAD", "XREADGROUP"):
        at = _streams_at(command)
        return key_slot(command[at]) if at < len(command) else None
    if name in _NO_KEY or len(command) < 2:
        return None
    return key_slot(command[1])


def _spans_slots(command: Sequence[Arg]) -> bool:
    """A multi-key command whose keys are in more than one slot."""
    name = _name(command)
    if name in _MULTI_KEY:
        keys = command[1:]
    elif name in ("XREAD", "XREADGROUP"):
        at = _streams_at(command)
        keys = command[at : at + (len(command) - at) // 2]
    else:
        return False
    return len(keys) > 1 and len({key_slot(k) for k in keys}) > 1


async def read_map(url: RedisURL) -> list[Addr | None]:
    """The slot map (slot -> master address) from the first seed (or known node) of
    ``url`` that answers ``CLUSTER SLOTS``.

    Raises :class:`ReplyError` (retrying cannot help) when every seed that answered is
    not a cluster node, :class:`ConnectionLost` naming each seed's failure otherwise."""
    failures: list[str] = []
    not_cluster: list[str] = []
    for host, port in url.seeds:
        where = f"{host}:{port}"
        try:
            reply = await ask_once(url.node(host, port), _open_one, "CLUSTER", "SLOTS")
        except (RedisError, OSError) as exc:
            failures.append(f"{where}: {exc}")
            continue
        if isinstance(reply, ReplyError):
            if "cluster support disabled" in reply.message:
                not_cluster.append(where)
            else:
                failures.append(f"{where}: {reply.message}")
            continue
        slots: list[Addr | None] = [None] * SLOTS
        for item in reply if isinstance(reply, list) else ():
            try:
                start, end, master = int(item[0]), int(item[1]), item[2]
                node_host = bytes(master[0]).decode() or host
                node = (node_host if node_host != "?" else host, int(master[1]))
            except (TypeError, ValueError, IndexError, UnicodeDecodeError):
                continue
            slots[start : end + 1] = [node] * (end + 1 - start)
        if not any(slots):
            failures.append(f"{where}: no slot is served (CLUSTER SLOTS is empty)")
            continue
        return slots
    if not_cluster and not failures:
        raise ReplyError(
            f"ERR {url.redacted()}: {', '.join(not_cluster)} is not a cluster node "
            "(cluster support disabled): use a redis:// URL for one server"
        )
    said = [*failures, *(f"{where}: not a cluster node" for where in not_cluster)]
    raise ConnectionLost(f"no seed of {url.redacted()} gave the slot map: {'; '.join(said)}")
