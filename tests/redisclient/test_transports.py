"""TLS (a trustme certificate), unix sockets, AUTH (password, ACL user) and SELECT."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import trio
import trustme

from bus.redis._client import (
    ConnectionLost,
    ReplyError,
    open_connection,
    open_pubsub,
)
from tests.redis.server import RedisServer, free_port, start_server
from tests.redisclient.conftest import caller_reads

pytestmark = pytest.mark.redis


def _links_openssl() -> bool:
    """Debian's redis-server is built with TLS (it links libssl); a build without it
    cannot start with --tls-port."""
    binary = shutil.which("redis-server") or "redis-server"
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
    except OSError:
        return True  # no ldd: assume TLS, and let a failed start say why
    return "libssl" in out.stdout


def _no_tls() -> NoReturn:
    """Skip for want of TLS, or fail under ``BUS_REQUIRE_REDIS=1`` (CI must test TLS)."""
    reason = "this redis-server was built without TLS (it does not link libssl)"
    if os.environ.get("BUS_REQUIRE_REDIS") == "1":
        pytest.fail(f"{reason}, and BUS_REQUIRE_REDIS=1 requires TLS", pytrace=False)
    pytest.skip(f"{reason}; set BUS_REQUIRE_REDIS=1 to fail instead")


def test_without_tls_the_tls_tests_skip_or_fail_as_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BUS_REQUIRE_REDIS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="built without TLS"):
        _no_tls()
    monkeypatch.setenv("BUS_REQUIRE_REDIS", "1")
    with pytest.raises(pytest.fail.Exception, match="BUS_REQUIRE_REDIS=1 requires TLS"):
        _no_tls()


@pytest.fixture
def tls_server(
    tmp_path: Path, redis_server: RedisServer
) -> Iterator[tuple[RedisServer, int, Path]]:
    """A server with a TLS port (and its plain port for the readiness check); yields
    the server, the TLS port and the CA's PEM file."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    tls_port = free_port()
    args = (
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(cert_file),
        "--tls-key-file",
        str(key_file),
        "--tls-ca-cert-file",
        str(ca_file),
        "--tls-auth-clients",
        "no",
    )
    try:
        server = start_server(tmp_path, extra_args=args)
    except RuntimeError:
        if _links_openssl():
            raise
        _no_tls()
    try:
        yield server, tls_port, ca_file
    finally:
        server.stop()


async def test_tls_with_a_trustme_certificate(tls_server: tuple[RedisServer, int, Path]) -> None:
    _, port, ca_file = tls_server
    url = f"rediss://127.0.0.1:{port}/2?ssl_ca_certs={ca_file}"
    big = os.urandom(3 * 1024 * 1024)
    with trio.fail_after(20):
        async with open_connection(url, name="tls-client") as conn:
            assert await conn.execute("SET", "k", big) == b"OK"
            assert await conn.execute("GET", "k") == big
            assert await conn.execute("CLIENT", "GETNAME") == b"tls-client"
            replies: list[bytes] = []

            async def call(i: int) -> None:
                replies.append(await conn.execute("ECHO", i))

            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(call, i)
            assert sorted(int(r) for r in replies) == list(range(100))
            async with open_pubsub(url) as ps:
                await ps.subscribe("c")
                assert await conn.execute("PUBLISH", "c", "over tls") == 1
                assert await ps.__anext__() == (b"c", b"over tls")
            assert conn.stats.own_reads == 0  # TLS: the reader hands every reply over


async def test_tls_with_an_ssl_context_and_a_refused_certificate(
    tls_server: tuple[RedisServer, int, Path],
) -> None:
    _, port, _ = tls_server
    with trio.fail_after(10):
        # Without the CA the server's certificate is refused ...
        with pytest.raises(ConnectionLost, match="could not connect"):
            async with open_connection(f"rediss://127.0.0.1:{port}"):
                pass
        # ... unless checking is off, or the context trusts the CA.
        async with open_connection(f"rediss://127.0.0.1:{port}?ssl_cert_reqs=none") as conn:
            assert await conn.execute("PING") == b"PONG"
        context = ssl.create_default_context()
        trustme.CA().configure_trust(context)  # some other CA: refused again
        with pytest.raises(ConnectionLost):
            async with open_connection(f"rediss://127.0.0.1:{port}", ssl_context=context):
                pass


async def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    server = start_server(
        tmp_path, extra_args=("--unixsocket", str(sock), "--unixsocketperm", "700")
    )
    try:
        with trio.fail_after(10):
            async with open_connection(f"unix://{sock}?db=2", name="over-unix") as conn:
                assert await conn.execute("SET", "k", "v") == b"OK"
                info = (await conn.execute("CLIENT", "INFO")).decode()
                assert " db=2 " in f" {info} " and "name=over-unix" in info
                assert await conn.pipeline([("GET", "k"), ("DBSIZE",)]) == [b"v", 1]
                assert await caller_reads(conn) > 0  # a plain socket: caller-read mode
    finally:
        server.stop()


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_server(
        tmp_path,
        extra_args=(
            "--requirepass",
            "s3cr:t/pw",
            "--user",
            "alice",
            "on",
            ">alicepw",
            "~*",
            "+@all",
        ),
    )
    try:
        yield server
    finally:
        server.stop()


async def test_auth_with_password_and_select_db(auth_server: RedisServer) -> None:
    base = f"127.0.0.1:{auth_server.port}"
    with trio.fail_after(10):
        async with open_connection(f"redis://:s3cr%3At%2Fpw@{base}/3") as conn:
            await conn.execute("SET", "only-in-3", "yes")
            assert " db=3 " in f" {(await conn.execute('CLIENT', 'INFO')).decode()} "
        async with open_connection(f"redis://alice:alicepw@{base}?db=3") as conn:
            assert await conn.execute("ACL", "WHOAMI") == b"alice"
            assert await conn.execute("GET", "only-in-3") == b"yes"
        with pytest.raises(ReplyError) as wrong:
            async with open_connection(f"redis://:not-the-pw@{base}/0"):
                pass
        assert wrong.value.code == "WRONGPASS"
        assert "not-the-pw" not in str(wrong.value)
        with pytest.raises(ReplyError) as noauth:
            async with open_connection(f"redis://{base}/0") as conn:
                await conn.execute("GET", "x")
        assert noauth.value.code == "NOAUTH"
        with pytest.raises(ReplyError, match="DB index is out of range"):
            async with open_connection(f"redis://:s3cr%3At%2Fpw@{base}/99"):
                pass
