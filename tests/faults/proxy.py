"""A Trio TCP proxy that injects faults between the bus and a real redis-server.

It runs in a nursery of the test (``await nursery.start(proxy.run)``) and is steered
from the test while it runs:

- ``proxy.mode = "pass"``: forward both ways (the default);
- ``"refuse"``: the listening socket is closed, so a new connection is refused
  (``ECONNREFUSED``, as when nothing listens); open connections go on;
- ``"blackhole"``: connections are accepted and kept open, but nothing is read or
  forwarded either way (bytes wait in the kernel, as on a partitioned network); when
  the mode leaves blackhole they flow again, as when the partition heals;
- ``"delay"``: every chunk is forwarded ``proxy.delay`` seconds after it arrived;
- ``"reset"``: a reply from Redis is cut: its first half is forwarded, then both
  sockets are reset (RST), on every connection, for as long as the mode lasts.

``await proxy.drop_all()`` resets every open connection; ``await proxy.outage()`` is
``refuse`` plus ``drop_all`` (what a client sees when Redis dies), ``proxy.heal()``
goes back to ``pass``.
"""

from __future__ import annotations

import contextlib
import errno
import math
import socket
import struct
from typing import Literal

import attrs
import trio

__all__ = ["FaultProxy", "Mode"]

Mode = Literal["pass", "refuse", "blackhole", "delay", "reset"]
_MODES = ("pass", "refuse", "blackhole", "delay", "reset")
#: Modes in which open connections forward (all but blackhole).
_FLOWING = ("pass", "refuse", "delay", "reset")


def _reset(stream: trio.SocketStream) -> None:
    """Make the next close send RST instead of FIN."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@attrs.define(eq=False)
class _Conn:
    client: trio.SocketStream
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    upstream: trio.SocketStream | None = None
    closed: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(eq=False)
class FaultProxy:
    """Listens on ``127.0.0.1:port`` (0: pick one) and forwards to ``target_port``."""

    target_port: int
    port: int = 0
    delay: float = 0.0
    #: Every connection accepted, ever (a test can tell reconnects from this).
    accepted: int = 0
    #: Connections reset by ``drop_all`` or the reset mode.
    resets: int = 0
    _mode: Mode = "pass"
    _changed: trio.Event = attrs.field(factory=trio.Event)
    _conns: set[_Conn] = attrs.field(factory=set)
    _nursery: trio.Nursery | None = None
    _listening: bool = False
    _listen_changed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown proxy mode {mode!r}")
        self._mode = mode
        self._changed.set()
        self._changed = trio.Event()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def applied(self) -> None:
        """Wait until the listening socket matches the mode (closed in ``refuse``,
        open otherwise): after it, a new connection is refused or accepted for sure."""
        while self._listening == (self._mode == "refuse"):
            await self._listen_changed.wait()

    def _set_listening(self, value: bool) -> None:
        self._listening = value
        self._listen_changed.set()
        self._listen_changed = trio.Event()

    async def _until(self, want: tuple[str, ...]) -> None:
        while self._mode not in want:
            await self._changed.wait()

    # ------------------------------------------------------------------ control

    async def drop_all(self) -> None:
        """Reset (RST) every open connection and wait until each is gone."""
        conns = list(self._conns)
        for c in conns:
            self._kill(c)
        for c in conns:
            await c.closed.wait()

    async def outage(self) -> None:
        """Redis is gone, as a client sees it: refuse new connections, reset open ones."""
        self.mode = "refuse"
        await self.applied()
        await self.drop_all()

    def heal(self) -> None:
        self.mode = "pass"

    def _kill(self, c: _Conn) -> None:
        _reset(c.client)
        if c.upstream is not None:
            _reset(c.upstream)
        self.resets += 1
        c.scope.cancel()

    # ---------------------------------------------------------------- serving

    async def run(
        self, *, task_status: trio.TaskStatus[FaultProxy] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; ``task_status.started`` once it listens."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            started = False
            try:
                while True:
                    await self._until(("pass", "blackhole", "delay", "reset"))
                    listener = await self._listen()
                    self._set_listening(True)
                    if not started:
                        task_status.started(self)
                        started = True
                    try:
                        accepting = trio.CancelScope()
                        nursery.start_soon(self._accept_loop, listener, accepting)
                        await self._until(("refuse",))
                        accepting.cancel()
                    finally:
                        listener.socket.close()
                        self._set_listening(False)
            finally:
                for c in list(self._conns):
                    self._kill(c)

    async def _listen(self) -> trio.SocketListener:
        for _ in range(200):
            try:
                listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            except OSError as exc:  # the port is briefly still taken after a close
                if exc.errno != errno.EADDRINUSE:
                    raise
                await trio.sleep(0.01)
                continue
            listener = listeners[0]
            self.port = listener.socket.getsockname()[1]
            return listener
        raise RuntimeError(f"proxy: port {self.port} stays in use")

    async def _accept_loop(self, listener: trio.SocketListener, scope: trio.CancelScope) -> None:
        assert self._nursery is not None
        with scope:
            while True:
                try:
                    stream = await listener.accept()
                except (trio.ClosedResourceError, OSError):
                    return
                self.accepted += 1
                conn = _Conn(stream)
                self._conns.add(conn)
                self._nursery.start_soon(self._serve, conn)

    async def _serve(self, c: _Conn) -> None:
        try:
            with c.scope:
                # A blackholed or refused-while-pending connection is held, never answered.
                await self._until(_FLOWING)
                try:
                    c.upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                except OSError:
                    _reset(c.client)  # Redis is down: the client sees a reset
                    return
                async with trio.open_nursery() as n:
                    n.start_soon(self._pump, c, c.client, c.upstream, False)
                    n.start_soon(self._pump, c, c.upstream, c.client, True)
        finally:
            self._conns.discard(c)
            with trio.CancelScope(shield=True):
                for s in (c.client, c.upstream):
                    if s is not None:
                        await s.aclose()
            c.closed.set()

    async def _pump(
        self, c: _Conn, src: trio.SocketStream, dst: trio.SocketStream, reply: bool
    ) -> None:
        # (due time, bytes, whether to reset the connection once they are written)
        send, receive = trio.open_memory_channel[tuple[float, bytes, bool]](math.inf)
        async with trio.open_nursery() as n:
            n.start_soon(self._writer, c, receive, dst)
            async with send:
                while True:
                    await self._until(_FLOWING)
                    try:
                        data = await src.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        break
                    # A chunk read just before a blackhole began is held back too.
                    await self._until(_FLOWING)
                    if reply and self._mode == "reset":
                        # Written by the writer, after what it still has to write (two
                        # tasks sending on one stream at once is an error in Trio).
                        cut = data[: max(1, len(data) // 2)] if len(data) > 1 else b""
                        send.send_nowait((trio.current_time(), cut, True))
                        await trio.sleep_forever()
                    due = trio.current_time() + (self.delay if self._mode == "delay" else 0.0)
                    send.send_nowait((due, data, False))
        # One side closed: close the other, as a plain forwarder would.
        c.scope.cancel()

    async def _writer(
        self,
        c: _Conn,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes, bool]],
        dst: trio.SocketStream,
    ) -> None:
        async with receive:
            async for due, data, reset in receive:
                await trio.sleep_until(due)
                await self._until(_FLOWING)
                try:
                    if data:
                        await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    c.scope.cancel()
                    return
                if reset:
                    self._kill(c)
                    return
