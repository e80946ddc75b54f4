"""Redis Cluster in the project's client: :class:`ClusterConnection`.

A ``redis+cluster://`` URL gives a :class:`ClusterConnection`: the slot map (from
``CLUSTER SLOTS``, asked of the first seed that answers) and one connection per master,
behind the interface of a :class:`~bus.redis._client.Connection`, so every user of a
connection (the broker's actors, the reader's blocking connection, the result store)
runs on a cluster unchanged:

- each command goes to the master of its key's slot (``{hash tags}`` honoured); a
  command without a key (``PING``, ``INFO``, ``PUBLISH``: a cluster broadcasts it) to
  any master; ``WAIT`` in a batch to every node the batch wrote to before it (its reply:
  the fewest replicas any of them confirmed); ``SCRIPT LOAD`` to every
  master; ``SCAN`` scans every master;
- a pipeline or a ``submit`` batch is split by node (one write per node) and its replies
  put back in order; ``MGET``, ``DEL``, ``EXISTS``, ``UNLINK``, ``TOUCH`` whose keys span
  slots are split by slot; an ``XREADGROUP`` over streams of several slots (a worker of
  queues on several masters) reads each slot on its master, first without blocking,
  then blocking on all of them at once;
- ``MOVED`` updates the map (and refreshes it whole, in the background) and the command
  runs again where it now lives; ``ASK`` sends ``ASKING`` and the command to the named
  node once; ``TRYAGAIN`` / ``CLUSTERDOWN`` are tried again with backoff within the
  command's timeout;
- the map is refreshed on a timer (:data:`REFRESH_INTERVAL`) and after redirections.

Supervision does the failover: when a master's connection breaks, the whole cluster
connection fails (``run`` raises ``ConnectionLost``) and its owner connects again, which
reads the map again and finds the promoted replica. A per-node supervised connection
(so that a failover of one master does not pause the others) is left for later.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs
import trio

from bus.redis._client import (
    Arg,
    Command,
    Connection,
    ConnectionLost,
    Pending,
    RedisError,
    Reply,
    ReplyError,
    Stats,
)
from bus.redis._slots import (
    _NO_KEY,
    _RETRY,
    Addr,
    _bytes,
    _name,
    _spans_slots,
    _streams_at,
    command_slot,
    key_slot,
    read_map,
)
from bus.redis._url import RedisURL

__all__ = ["ClusterConnection", "command_slot", "key_slot"]

#: Seconds between two readings of the slot map (also read after a MOVED).
REFRESH_INTERVAL: Final = 5.0
#: Redirections (MOVED/ASK) and retries (TRYAGAIN/CLUSTERDOWN) one command may take.
MAX_REDIRECTS: Final = 16


# --------------------------------------------------------------------------- pending


class _ClusterPending(Pending):
    """The replies of a batch split by node, put back in order; commands redirected
    (MOVED, ASK, TRYAGAIN, CLUSTERDOWN) or spanning slots are run again one by one."""

    def __init__(self, cluster: ClusterConnection, commands: list[Command]) -> None:
        super().__init__(cluster, len(commands))
        self.cluster = cluster
        self.commands = commands
        self.parts: list[tuple[list[int], Pending]] = []
        self.later: list[int] = []
        #: A WAIT's index -> the nodes the batch wrote to before it.
        self.waits: dict[int, list[Addr]] = {}
        self.result: list[Reply] | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or (
            not self.later and all(pending.done for _, pending in self.parts)
        )

    async def wait(self, *, flush: bool = True) -> list[Reply]:
        if self.result is not None:
            await trio.lowlevel.checkpoint()
            return self.result
        replies: list[Reply] = [None] * len(self.commands)
        for indexes, pending in self.parts:
            for i, reply in zip(indexes, await pending.wait(flush=flush), strict=True):
                replies[i] = reply
        again = list(self.later)
        again += [
            i
            for indexes, _ in self.parts
            for i in indexes
            if isinstance(replies[i], ReplyError) and replies[i].code in _RETRY
        ]
        for i in sorted(again):
            try:
                if i in self.waits:  # the fewest replicas any written node confirmed
                    replies[i] = await self.cluster.wait_on(self.waits[i], self.commands[i])
                else:
                    replies[i] = await self.cluster.execute(*self.commands[i])
            except ReplyError as exc:
                replies[i] = exc
        self.result = replies
        return replies


# --------------------------------------------------------------------------- connection


class ClusterConnection(Connection):
    """A :class:`Connection` to a whole Redis Cluster (see the module's docstring).
    Make one with :meth:`connect` (or ``Connection.connect`` of a cluster URL) and
    start :meth:`run` in a nursery, as for one connection."""

    def __init__(  # no socket of its own: the nodes have theirs
        self,
        url: RedisURL,
        name: str | None,
        slots: list[Addr | None],
        nodes: dict[Addr, Connection],
    ) -> None:
        self.url = url
        self.name = name
        self.stats = Stats()
        self._slots = slots
        self._nodes = nodes
        self._error: str | None = None
        self._cause: BaseException | None = None
        self._closing = False
        self._started = False
        self._too_large = False
        self._failed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._connecting: dict[Addr, trio.Event] = {}
        self._refreshing = False

    @classmethod
    async def connect(
        cls, url: str | RedisURL, *, name: str | None = None, ssl_context: Any = None
    ) -> ClusterConnection:
        """Read the slot map and connect to every master. Raises as
        :meth:`Connection.connect`; a URL whose seeds are not cluster nodes raises
        :class:`ReplyError` (retrying will not help)."""
        url = url if isinstance(url, RedisURL) else RedisURL.parse(url)
        slots = await read_map(url)
        nodes: dict[Addr, Connection] = {}
        try:
            for addr in dict.fromkeys(a for a in slots if a is not None):
                nodes[addr] = await Connection.connect(url.node(*addr), name=name)
        except BaseException:
            for conn in nodes.values():
                await conn.aclose()
            raise
        return cls(url, name, slots, nodes)

    def __repr__(self) -> str:
        state = "open" if self._error is None else "closed"
        return f"<ClusterConnection {self.url.redacted()} nodes={len(self._nodes)} {state}>"

    @property
    def is_closed(self) -> bool:
        return self._error is not None

    def _lost(self) -> ConnectionLost:
        exc = ConnectionLost(f"{self.url.redacted()}: {self._error}")
        exc.__cause__ = self._cause
        return exc

    def _set_error(self, why: str, cause: BaseException | None = None) -> None:
        if self._error is None:
            self._error = why
            self._cause = cause
            self._failed.set()

    # -- the reader: every node's

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._started:
            raise RuntimeError(f"{self!r}: run() was already started")
        self._started = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for addr, conn in list(self._nodes.items()):
                    await nursery.start(self._serve_node, addr, conn)
                nursery.start_soon(self._refresh_timer)
                task_status.started()
                await self._failed.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._set_error("closed: its reader was cancelled")
            with trio.CancelScope(shield=True):
                for conn in list(self._nodes.values()):
                    await conn.aclose()
        if not self._closing:
            raise self._lost()

    async def _serve_node(
        self, addr: Addr, conn: Connection, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            await conn.run(task_status=task_status)
        except RedisError as exc:
            self._set_error(f"the connection to {addr[0]}:{addr[1]} broke: {exc}", exc)
        else:
            if self._nodes.get(addr) is conn:
                self._set_error(f"the connection to {addr[0]}:{addr[1]} was closed")

    async def _refresh_timer(self) -> None:
        while True:
            await trio.sleep(REFRESH_INTERVAL)
            await self._refresh()

    async def _refresh(self) -> None:
        """Read the slot map again (from the nodes known now) and connect to new
        masters; a failure to read it is ignored (the next MOVED or timer tries)."""
        if self._refreshing:
            return
        self._refreshing = True
        try:
            seeds = tuple(dict.fromkeys([*(a for a in self._nodes), *self.url.seeds]))
            try:
                slots = await read_map(attrs.evolve(self.url, seeds=seeds))
            except (RedisError, OSError):
                return
            for addr in dict.fromkeys(a for a in slots if a is not None):
                await self._node(addr)
            self._slots = slots
        except (RedisError, OSError):
            return
        finally:
            self._refreshing = False

    async def _node(self, addr: Addr) -> Connection:
        """The connection to ``addr``, connected now if it is new."""
        while True:
            self._check()
            conn = self._nodes.get(addr)
            if conn is not None:
                return conn
            event = self._connecting.get(addr)
            if event is not None:
                await event.wait()
                continue
            event = self._connecting[addr] = trio.Event()
            try:
                conn = await Connection.connect(self.url.node(*addr), name=self.name)
                if self._nursery is None:
                    await conn.aclose()
                    raise self._lost()
                await self._nursery.start(self._serve_node, addr, conn)
                self._nodes[addr] = conn
                return conn
            finally:
                del self._connecting[addr]
                event.set()

    def _check(self) -> None:
        if self._error is not None:
            raise self._lost()
        if not self._started:
            raise RuntimeError(f"{self!r}: its run() reader is not running (start it first)")

    def _addr(self, slot: int | None) -> Addr:
        if slot is not None:
            addr = self._slots[slot]
            if addr is not None:
                return addr
        return next(iter(self._nodes))

    # -- redirections

    async def _redirected(self, exc: ReplyError, tries: int, deadline: float) -> Addr | None:
        """Where to send a command again after ``exc`` (and whether with ASKING: the
        caller looks at the code); ``None``: give up and raise ``exc``."""
        if tries >= MAX_REDIRECTS:
            return None
        if exc.code in ("MOVED", "ASK"):
            parts = exc.message.split()
            try:
                slot = int(parts[1])
                host, _, port = parts[2].rpartition(":")
                addr = (host or self.url.host, int(port))
            except (IndexError, ValueError):
                return None
            if exc.code == "MOVED":
                await self._node(addr)
                self._slots[slot] = addr
                if self._nursery is not None and not self._refreshing:
                    self._nursery.start_soon(self._refresh)
            return addr
        if exc.code in ("TRYAGAIN", "CLUSTERDOWN"):
            pause = min(0.02 * 2**tries, 0.5)
            if trio.current_time() + pause >= deadline:
                return None
            await trio.sleep(pause)
            return ("", 0)  # the slot's master again
        return None

    async def _routed(self, args: Sequence[Arg], timeout: float | None) -> Reply:
        """Run one command where its slot lives, following redirections."""
        slot = command_slot(args)
        deadline = trio.current_time() + (self.url.command_timeout if timeout is None else timeout)
        addr = self._addr(slot)
        asking = False
        tries = 0
        while True:
            conn = await self._node(addr)
            try:
                if asking:
                    replies = await conn.pipeline([("ASKING",), tuple(args)], timeout=timeout)
                    if isinstance(replies[1], ReplyError):
                        raise replies[1]
                    return replies[1]
                return await conn.execute(*args, timeout=timeout)
            except ReplyError as exc:
                where = await self._redirected(exc, tries, deadline)
                if where is None:
                    raise
                tries += 1
                asking = exc.code == "ASK"
                addr = where if where[0] else self._addr(slot)

    # -- the API

    async def execute(self, *args: Arg, timeout: float | None = None) -> Reply:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check()
        name = _name(args)
        if name == "SCRIPT" and len(args) > 1 and _bytes(args[1]).upper() == b"LOAD":
            replies = [await conn.execute(*args) for conn in list(self._nodes.values())]
            return replies[0]
        if name == "SCAN":
            return await self._scan(args, timeout)
        if _spans_slots(args):
            if name == "XREADGROUP" or name == "XREAD":
                return await self._read_streams(args, timeout)
            return await self._split_keys(name, args, timeout)
        return await self._routed(args, timeout)

    async def _split_keys(self, name: str, args: Sequence[Arg], timeout: float | None) -> Reply:
        """A multi-key command over several slots: one per slot, the replies joined
        (MGET: in the keys' order; the counting ones: summed)."""
        keys = list(args[1:])
        by_slot: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_slot.setdefault(key_slot(key), []).append(i)
        if name == "MGET":
            values: list[Reply] = [None] * len(keys)
            for indexes in by_slot.values():
                got = await self._routed(("MGET", *(keys[i] for i in indexes)), timeout)
                assert isinstance(got, list)
                for i, value in zip(indexes, got, strict=True):
                    values[i] = value
            return values
        total = 0
        for indexes in by_slot.values():
            count = await self._routed((args[0], *(keys[i] for i in indexes)), timeout)
            total += int(count) if isinstance(count, int) else 0
        return total

    async def _read_streams(self, args: Sequence[Arg], timeout: float | None) -> Reply:
        """XREADGROUP / XREAD over streams of several slots: each slot's streams read
        on their master, first without BLOCK (entries waiting anywhere come at once),
        then, if none came, blocking on all of them at once."""
        at = _streams_at(args)
        half = (len(args) - at) // 2
        streams, ids = list(args[at : at + half]), list(args[at + half :])
        head = list(args[:at])
        unblocked = list(head)
        for i, arg in enumerate(head):
            if _bytes(arg).upper() == b"BLOCK" and i + 1 < len(head):
                unblocked = head[:i] + head[i + 2 :]
                break
        by_slot: dict[int, list[int]] = {}
        for i, key in enumerate(streams):
            by_slot.setdefault(key_slot(key), []).append(i)

        def part(prefix: list[Arg], indexes: list[int]) -> tuple[Arg, ...]:
            return (
                *prefix,
                *(streams[i] for i in indexes),
                *(ids[i] for i in indexes),
            )

        out: list[Any] = []
        for indexes in by_slot.values():
            got = await self._routed(part(unblocked, indexes), timeout)
            if isinstance(got, list):
                out.extend(got)
        if out or unblocked == head:
            return out or None
        replies: list[Any] = [None] * len(by_slot)

        async def read(n: int, indexes: list[int]) -> None:
            replies[n] = await self._routed(part(head, indexes), timeout)

        try:
            async with trio.open_nursery() as nursery:
                for n, indexes in enumerate(by_slot.values()):
                    nursery.start_soon(read, n, indexes)
        except BaseExceptionGroup as group:  # one error, not a group
            raise group.exceptions[0] from None
        for got in replies:
            if isinstance(got, list):
                out.extend(got)
        return out or None

    async def _scan(self, args: Sequence[Arg], timeout: float | None) -> Reply:
        """SCAN of every master at once: the whole scan is done on the first call
        (cursor 0) and returned with cursor 0."""
        keys: list[Any] = []
        for conn in list(self._nodes.values()):
            cursor: Arg = 0
            while True:
                reply = await conn.execute("SCAN", cursor, *args[2:], timeout=timeout)
                assert isinstance(reply, list)
                cursor, found = reply[0], reply[1]
                keys.extend(found)
                if cursor in (b"0", 0, "0"):
                    break
        return [b"0", keys]

    async def wait_on(self, nodes: list[Addr], command: Command) -> Reply:
        """``WAIT`` on each of ``nodes``: the fewest replicas that confirmed."""
        counts = [await (await self._node(addr)).execute(*command) for addr in nodes]
        return min(c if isinstance(c, int) else 0 for c in counts)

    async def pipeline(
        self, commands: Iterable[Command], *, timeout: float | None = None
    ) -> list[Reply]:
        await trio.lowlevel.checkpoint_if_cancelled()
        return await self.submit(commands, timeout=timeout).wait()

    async def transaction(
        self, commands: Sequence[Command], *, timeout: float | None = None
    ) -> list[Reply]:
        """MULTI ... EXEC on the master of the first keyed command's slot (every key of
        a transaction must be in one slot on a cluster)."""
        self._check()
        slot = next((s for c in commands if (s := command_slot(c)) is not None), None)
        conn = await self._node(self._addr(slot))
        return await conn.transaction(commands, timeout=timeout)

    def submit(
        self, commands: Iterable[Command], *, timeout: float | None = None, eager: bool = False
    ) -> Pending:
        # (``eager`` is not passed on: several nodes' commands are never one caller's
        # lone command, and a node's own submits gather them.)
        self._check()
        batch = list(commands)
        pending = _ClusterPending(self, batch)
        groups: dict[Addr, list[int]] = {}
        written: list[Addr] = []
        for i, command in enumerate(batch):
            name = _name(command)
            if name == "WAIT":
                # On every node written to before it, once their replies are in.
                pending.waits[i] = list(written) or [self._addr(None)]
                pending.later.append(i)
                continue
            if name in ("SCRIPT", "SCAN") or _spans_slots(command):
                pending.later.append(i)
                continue
            else:
                addr = self._addr(command_slot(command))
                if addr not in self._nodes:
                    pending.later.append(i)
                    continue
            if name not in _NO_KEY and addr not in written:
                written.append(addr)
            groups.setdefault(addr, []).append(i)
        for addr, indexes in groups.items():
            part = self._nodes[addr].submit([batch[i] for i in indexes], timeout=timeout)
            pending.parts.append((indexes, part))
        self.stats.commands += len(batch)
        return pending

    async def flush(self) -> None:
        self._check()
        for conn in list(self._nodes.values()):
            await conn.flush()

    def flush_nowait(self) -> bool:
        self._check()
        written = True
        for conn in list(self._nodes.values()):
            written = conn.flush_nowait() and written  # every node's, whatever the others
        return written

    async def drop(self, why: str) -> None:
        self._set_error(why)
        for conn in list(self._nodes.values()):
            await conn.aclose()

    async def aclose(self) -> None:
        if self._error is None:
            self._closing = True
        self._set_error("closed by aclose()")
        for conn in list(self._nodes.values()):
            await conn.aclose()
        await trio.lowlevel.checkpoint()
