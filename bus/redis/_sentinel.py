"""Redis Sentinel: which server is the master of a ``redis+sentinel://`` URL.

The client's connect step (``_client._open``) asks the sentinels here, then connects
to the master they name and checks with ``ROLE`` that it is one. Nothing else is
needed for a failover: a connection to a master that died breaks, one to a master
that was demoted is dropped at its first ``READONLY`` reply, and one whose service
the sentinels switched (``+switch-master``, see :class:`SwitchWatch` in
``_failover``) is dropped by the connection actor; supervision then connects again,
which resolves the master again. Nothing is ever written to a replica.

This module talks to the sentinels over a plain connection of its own (one command,
then closed): it imports nothing of the client, which calls it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from bus.redis._resp import (
    MORE,
    ConnectionLost,
    RedisError,
    Reply,
    ReplyError,
    encode,
    new_reader,
)
from bus.redis._url import RedisURL

__all__ = ["UnknownService", "ask_once", "master_of", "sentinel_url"]

#: Opens a stream to one server as the client does (TLS, AUTH): ``_client._open``.
_Streams = tuple[trio.abc.Stream, trio.SocketStream]
Opener = Callable[[RedisURL, str | None, None], Awaitable[_Streams]]


class UnknownService(ReplyError):
    """No sentinel knows a master of that name: retrying will not help."""


def sentinel_url(url: RedisURL, host: str, port: int) -> RedisURL:
    """How to reach one sentinel of ``url``: its options and TLS, no credentials (those
    are the Redis nodes'), db 0."""
    node = url.node(host, port)
    return RedisURL(
        host=node.host,
        port=node.port,
        tls=node.tls,
        connect_timeout=node.connect_timeout,
        command_timeout=node.command_timeout,
        max_reply_bytes=node.max_reply_bytes,
        ssl_cert_reqs=node.ssl_cert_reqs,
        ssl_ca_certs=node.ssl_ca_certs,
    )


async def ask_once(url: RedisURL, opener: Opener, *command: str) -> Reply:
    """One command on a connection of its own (opened by ``opener``), then closed."""
    stream, transport = await opener(url, None, None)
    try:
        with trio.fail_after(url.command_timeout):
            await stream.send_all(encode(command))
            reader = new_reader()
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise ConnectionLost(f"{url.redacted()}: the sentinel closed the connection")
                reader.feed(chunk)  # type: ignore[arg-type]  # any buffer works
                reply = reader.gets()
                if reply is not MORE:
                    return reply
    except trio.TooSlowError:
        why = f"no answer within {url.command_timeout} s"
        raise ConnectionLost(f"{url.redacted()}: {why}") from None
    except (trio.BrokenResourceError, OSError) as exc:
        raise ConnectionLost(f"{url.redacted()}: {exc}") from exc
    finally:
        await trio.aclose_forcefully(transport)


async def master_of(
    url: RedisURL, opener: Opener, skip: frozenset[tuple[str, int]] = frozenset()
) -> tuple[str, int]:
    """The address of the master that the sentinels of ``url`` name for its service,
    from the first sentinel that knows it (in the URL's order), passing over the
    addresses in ``skip`` (a stale sentinel's answer that turned out to be a replica).

    Raises :class:`UnknownService` if every sentinel answered and none knows the
    name, :class:`ConnectionLost` naming each sentinel's failure otherwise."""
    assert url.service is not None
    failures: list[str] = []
    unknown: list[str] = []
    for host, port in url.seeds:
        where = f"{host}:{port}"
        try:
            reply = await ask_once(
                sentinel_url(url, host, port),
                opener,
                "SENTINEL",
                "GET-MASTER-ADDR-BY-NAME",
                url.service,
            )
        except (RedisError, OSError) as exc:
            failures.append(f"{where}: {exc}")
            continue
        if reply is None:
            unknown.append(where)
        elif isinstance(reply, ReplyError):
            failures.append(f"{where}: {reply.message}")
        elif isinstance(reply, list) and len(reply) == 2:
            try:
                address = bytes(reply[0]).decode(), int(reply[1])
            except (TypeError, ValueError, UnicodeDecodeError):
                failures.append(f"{where}: a malformed answer {reply!r:.100}")
                continue
            if address not in skip:
                return address
            failures.append(f"{where}: names {address[0]}:{address[1]}, not a master")
        else:
            failures.append(f"{where}: a malformed answer {reply!r:.100}")
    if unknown and not failures:
        raise UnknownService(
            f"ERR no sentinel knows a master named {url.service!r} "
            f"(asked {', '.join(unknown)} of {url.redacted()})"
        )
    said = [*failures, *(f"{where}: no master named {url.service!r}" for where in unknown)]
    raise ConnectionLost(f"no sentinel of {url.redacted()} named the master: {'; '.join(said)}")
