"""Who may use the dashboard (issue 18): the Host check on every address it listens
on (DNS rebinding), a non-loopback bind refused without allowed host names, loopback
decided by address (127.0.0.0/8, ::1, localhost), and the optional token, asked by the
page and its JSON API alike. Over real HTTP (hypercorn, Trio mode)."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
from starlette.applications import Starlette
from starlette.routing import Mount

import bus
from bus.dashboard import Dashboard, serve
from bus.dashboard._security import (
    SESSION_COOKIE,
    SESSION_SECONDS,
    allowed_hosts_for,
    is_loopback,
    new_session,
    token_matches,
    valid_session,
)
from tests.observability.redis_app import make_broker
from tests.observability.support import APP, ROOT, bus_env, eventually, run_bus
from tests.redis.server import RedisServer

TOKEN = "correct-horse-battery-staple-42"


@asynccontextmanager
async def served(
    broker: bus.Broker, host: str = "127.0.0.1", **options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """Serve ``broker``'s dashboard on ``host`` and a free port: an HTTP client for
    it (``http.base_url.port`` is the port)."""
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            lambda task_status: serve(
                broker, host=host, port=0, sample_interval=0.2, task_status=task_status, **options
            )
        )
        split = urlsplit(urls[0])
        assert split.port is not None
        connect = "127.0.0.1" if split.hostname in ("0.0.0.0", "127.1") else split.hostname
        assert connect is not None
        async with client(connect, split.port) as http:
            yield http
        nursery.cancel_scope.cancel()


def client(address: str, port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://{address}:{port}", timeout=10)


# ------------------------------------------------------------- host names, binds


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("127.1", True),
        ("127.255.255.254", True),
        ("0x7f.1", True),
        ("::1", True),
        ("[::1]", True),
        ("0:0:0:0:0:0:0:1", True),
        ("::ffff:127.0.0.2", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("0.0.0.0", False),
        ("::", False),
        ("128.0.0.1", False),
        ("192.168.1.5", False),
        ("10.0.0.1", False),
        ("127.example.com", False),
        ("localhost.example.com", False),
        ("dashboard.internal", False),
    ],
)
def test_loopback_is_decided_by_address(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    if loopback:
        names = allowed_hosts_for(host, None)
        assert {"127.0.0.1", "localhost", "::1"} <= names
        assert "attacker.example" not in names
    else:
        with pytest.raises(ValueError, match="not a loopback address"):
            allowed_hosts_for(host, None)
        assert "dash.example" in allowed_hosts_for(host, ["Dash.Example."])


@pytest.mark.parametrize("name", ["http://dash.example", "dash.example:8080", "a b", "", "x/y"])
def test_an_allowed_host_is_a_bare_name(name: str) -> None:
    with pytest.raises(ValueError, match="not a host name or an IP address"):
        allowed_hosts_for("0.0.0.0", [name])
    with pytest.raises(ValueError, match="not a host name or an IP address"):
        Dashboard(bus.InMemoryBroker(), allowed_hosts=[name])


async def test_a_non_loopback_bind_without_allowed_hosts_does_not_start() -> None:
    broker = bus.InMemoryBroker()
    with trio.fail_after(10):
        async with broker:
            for host in ("0.0.0.0", "::"):
                with pytest.raises(ValueError, match="not a loopback address"):
                    await serve(broker, host=host, port=0)


@pytest.mark.parametrize(
    ("bind", "names"),
    [
        ("127.0.0.2", ["127.0.0.2", "127.0.0.1", "localhost", "[::1]"]),
        ("127.1", ["127.1", "127.0.0.1", "localhost"]),
        ("localhost", ["localhost", "127.0.0.1"]),
    ],
)
async def test_every_loopback_bind_checks_the_host(bind: str, names: list[str]) -> None:
    broker = bus.InMemoryBroker()
    with trio.fail_after(20):
        async with broker, served(broker, bind) as http:
            port = http.base_url.port
            for name in names:
                ok = await http.get("/api/overview", headers={"Host": f"{name}:{port}"})
                assert ok.status_code == 200, name
            for name in ("attacker.example", "127.0.0.2.attacker.example", "localhost.evil"):
                refused = await http.get("/", headers={"Host": f"{name}:{port}"})
                assert refused.status_code == 403, name
                assert "unknown host" in refused.text


@pytest.mark.redis
async def test_dns_rebinding_on_0_0_0_0_cannot_purge_dead_letters(
    redis_server: RedisServer,
) -> None:
    prefix = f"s{bus.TaskID.new()[-12:]}"
    worker_broker = make_broker(redis_server.url, prefix)
    broker = make_broker(redis_server.url, prefix)
    with trio.fail_after(30):
        async with broker, trio.open_nursery() as nursery:
            await nursery.start(worker_broker.run_worker, 2)
            failed = await broker.tasks["fail"].kiq(1)
            assert (await failed.wait_result()).is_err

            async def one_letter() -> bool:
                return len(await broker.dead_letters()) == 1

            await eventually(one_letter)
            options = {"allow_actions": True, "allowed_hosts": ["dash.example"]}
            async with served(broker, "0.0.0.0", **options) as http:
                port = http.base_url.port
                # A page of attacker.example, whose name now resolves to this
                # machine: its requests name its own host, its own origin.
                evil = {"Host": f"attacker.example:{port}"}
                origin = {"Origin": f"http://attacker.example:{port}"}
                assert (await http.get("/", headers=evil)).status_code == 403
                assert (await http.get("/api/dead", headers=evil)).status_code == 403
                purge = await http.post(
                    "/api/dead/purge", json={"confirm": True}, headers=evil | origin
                )
                assert purge.status_code == 403
                assert len(await broker.dead_letters()) == 1
                # The names it was told, and the loopback names, are answered.
                good = {"Host": f"dash.example:{port}"}
                assert (await http.get("/api/overview", headers=good)).status_code == 200
                local = await http.get("/api/overview", headers={"Host": f"localhost:{port}"})
                assert local.status_code == 200
                # Its own origin may act; another origin may not, even so named.
                foreign = {"Origin": "http://attacker.example"}
                refused = await http.post(
                    "/api/dead/purge", json={"confirm": True}, headers=good | foreign
                )
                assert refused.status_code == 403
                cross_site = {
                    "Origin": f"http://dash.example:{port}",
                    "Sec-Fetch-Site": "cross-site",
                }
                refused = await http.post(
                    "/api/dead/purge", json={"confirm": True}, headers=good | cross_site
                )
                assert refused.status_code == 403
                assert len(await broker.dead_letters()) == 1
                mine = {"Origin": f"http://dash.example:{port}"}
                purged = await http.post(
                    "/api/dead/purge", json={"confirm": True}, headers=good | mine
                )
                assert purged.json() == {"purged": 1}
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------ token


def basic(password: str, user: str = "") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def test_the_token_is_asked_by_the_page_and_the_api() -> None:
    broker = bus.InMemoryBroker()
    with trio.fail_after(20):
        async with broker, served(broker, token=TOKEN, allow_actions=True) as http:
            for path in ("/", "/api/overview", "/api/dead", f"/api/tasks/{bus.TaskID.new()}"):
                refused = await http.get(path)
                assert refused.status_code == 401, path
                assert refused.headers["www-authenticate"].startswith("Bearer ")
                assert "correct-horse" not in refused.text
                for wrong in (
                    {"Authorization": f"Bearer {TOKEN}x"},
                    {"Authorization": f"Bearer {TOKEN[:-1]}"},
                    {"Authorization": "Bearer"},
                    {"Authorization": TOKEN},
                    basic(TOKEN + "x"),
                    {"Cookie": f"{SESSION_COOKIE}=123.abc"},
                ):
                    assert (await http.get(path, headers=wrong)).status_code == 401
                for right in (BEARER, {"Authorization": f"bearer  {TOKEN}"}, basic(TOKEN)):
                    assert (await http.get(path, headers=right)).status_code == 200, path
                assert (await http.get(path, headers=basic(TOKEN, "me"))).status_code == 200
            # The page without the token is the login form, and nothing of the queue.
            form = await http.get("/")
            assert 'id="login"' in form.text and 'id="bus-data"' not in form.text
            assert "script-src 'self'" in form.headers["content-security-policy"]
            # The actions ask for it too, before anything else.
            purge = await http.post("/api/dead/purge", json={"confirm": True})
            assert purge.status_code == 401
            ok = await http.post("/api/dead/purge", json={"confirm": True}, headers=BEARER)
            assert ok.json() == {"purged": 0}
            # The static files are the package's own: no token needed.
            assert (await http.get("/static/dashboard.js")).status_code == 200
            assert (await http.get("/static/dashboard.css")).status_code == 200


async def test_the_login_form_sets_a_strict_httponly_session_cookie() -> None:
    broker = bus.InMemoryBroker()
    with trio.fail_after(20):
        async with broker, served(broker, token=TOKEN) as http:
            origin = {"Origin": str(http.base_url).rstrip("/")}
            wrong = await http.post("/login", data={"token": "guess"}, headers=origin)
            assert wrong.status_code == 401 and "not the token" in wrong.text
            assert SESSION_COOKIE not in http.cookies
            foreign = await http.post(
                "/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"}
            )
            assert foreign.status_code == 403 and SESSION_COOKIE not in http.cookies
            sandboxed = await http.post("/login", data={"token": TOKEN}, headers={"Origin": "null"})
            assert sandboxed.status_code == 403 and SESSION_COOKIE not in http.cookies
            done = await http.post("/login", data={"token": TOKEN}, headers=origin)
            assert done.status_code == 303 and done.headers["location"] == "/"
            cookie = done.headers["set-cookie"].lower()
            assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
            assert TOKEN.lower() not in cookie
            # The cookie opens the page and the API.
            page = await http.get("/")
            assert page.status_code == 200 and 'id="bus-data"' in page.text
            assert 'id="logout"' in page.text
            assert (await http.get("/api/overview")).status_code == 200
            out = await http.post("/logout", headers=origin)
            assert out.status_code == 303
            assert (await http.get("/api/overview")).status_code == 401


async def test_serve_takes_the_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUS_DASHBOARD_TOKEN", TOKEN)
    broker = bus.InMemoryBroker()
    with trio.fail_after(20):
        async with broker:
            async with served(broker) as http:
                assert (await http.get("/api/overview")).status_code == 401
                assert (await http.get("/api/overview", headers=BEARER)).status_code == 200
                too_many = await http.post(
                    "/login", content=b"a=1&b=2&c=3&d=4&e=5&token=x",
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                )  # fmt: skip
                assert too_many.status_code == 400
            async with served(broker, token=None) as http:  # None: no token, whatever the env
                assert (await http.get("/api/overview")).status_code == 200
            monkeypatch.setenv("BUS_DASHBOARD_TOKEN", "short")
            with pytest.raises(ValueError, match=r"BUS_DASHBOARD_TOKEN: .* at least 16"):
                await serve(broker, port=0)


def test_a_specific_exposed_address_answers_its_own_name() -> None:
    names = allowed_hosts_for("192.168.1.5", ["dash.example"])
    assert {"dash.example", "192.168.1.5", "127.0.0.1"} <= names
    assert "0.0.0.0" not in allowed_hosts_for("0.0.0.0", ["dash.example"])


def test_a_session_lasts_its_time_and_belongs_to_its_token() -> None:
    session = new_session(TOKEN, now=1000.0)
    assert valid_session(TOKEN, session, now=1000.0 + SESSION_SECONDS - 1)
    assert not valid_session(TOKEN, session, now=1000.0 + SESSION_SECONDS)
    assert not valid_session(TOKEN + "2", session, now=1001.0)
    issued, _, mac = session.partition(".")
    assert not valid_session(TOKEN, f"{int(issued) + 1}.{mac}", now=1001.0)
    assert not valid_session(TOKEN, "", now=1001.0)
    assert not token_matches(TOKEN, None) and not token_matches(TOKEN, "Basic !!!")


@pytest.mark.parametrize("token", ["", "short", "sixteen chars ok", "x" * 15, "tøken-tøken-tøken"])
def test_a_weak_or_unsendable_token_is_refused(token: str) -> None:
    with pytest.raises(ValueError, match="token"):
        Dashboard(bus.InMemoryBroker(), token=token)


async def test_the_mounted_app_takes_allowed_hosts_and_a_token() -> None:
    broker = bus.InMemoryBroker()
    dashboard = Dashboard(broker, allowed_hosts=["web.example"], token=TOKEN)
    web = Starlette(routes=[Mount("/bus", app=dashboard)])
    with trio.fail_after(20):
        async with broker:
            transport = httpx.ASGITransport(app=web)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://web.example"
            ) as http:
                assert (await http.get("/bus/api/overview")).status_code == 401
                assert (await http.get("/bus/api/overview", headers=BEARER)).status_code == 200
                other = {"Host": "attacker.example"} | BEARER
                assert (await http.get("/bus/api/overview", headers=other)).status_code == 403
                origin = {"Origin": "http://web.example"}
                done = await http.post("/bus/login", data={"token": TOKEN}, headers=origin)
                assert done.status_code == 303 and done.headers["location"] == "/bus/"
                assert "path=/bus/" in done.headers["set-cookie"].lower()
                assert (await http.get("/bus/")).status_code == 200
            await dashboard.data.stop()


# -------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--host", "0.0.0.0"], {}, "'0.0.0.0', which is not a loopback address"),
        (["--host", "192.168.1.5"], {}, "with --allowed-host NAME"),
        (["--host", "::"], {}, "not a loopback address"),
        (["--allowed-host", "http://x"], {}, "not a host name or an IP address"),
        ([], {"BUS_DASHBOARD_TOKEN": "short"}, "BUS_DASHBOARD_TOKEN: the dashboard token"),
        ([], {"BUS_DASHBOARD_TOKEN": ""}, "at least 16 characters"),
    ],
)
def test_bus_dashboard_refuses_to_start_on_one_line(
    args: list[str], env: dict[str, str], message: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bus", "dashboard", APP, "--port", "0", *args],
        cwd=ROOT, env=bus_env("redis://127.0.0.1:1", "x", **env),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("bus: error: ") and message in done.stderr
    assert done.stderr.count("\n") == 1


def test_the_docs_show_the_refusal_as_printed() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bus", "dashboard", APP, "--host", "0.0.0.0"],
        cwd=ROOT, env=bus_env("redis://127.0.0.1:1", "x"),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    docs = (ROOT / "docs" / "observability.md").read_text()
    printed = docs.split("$ bus dashboard myapp.tasks:broker --host 0.0.0.0\n", 1)[1]
    assert done.stderr == printed.lstrip(" ").splitlines()[0] + "\n"


@pytest.mark.redis
async def test_bus_dashboard_exposed_with_allowed_hosts_and_a_token(
    redis_server: RedisServer,
) -> None:
    env = bus_env(redis_server.url, f"s{bus.TaskID.new()[-12:]}", BUS_DASHBOARD_TOKEN=TOKEN)
    args = ("--host", "0.0.0.0", "--port", "0", "--allowed-host", "dash.example")
    with trio.fail_after(30):
        async with run_bus(env, "dashboard", APP, *args) as proc:
            (found,) = await proc.wait_for(
                r"bus dashboard: http://0\.0\.0\.0:(\d+)/ \(read-only, token required\)"
            )
            async with client("127.0.0.1", int(found[1])) as http:
                good = {"Host": "dash.example"}
                assert (await http.get("/api/overview", headers=good)).status_code == 401
                assert (await http.get("/", headers=good)).status_code == 401
                ok = await http.get("/api/overview", headers=good | BEARER)
                assert ok.status_code == 200 and ok.json()["broker"]["queue"] == "q"
                assert (await http.get("/", headers=good | BEARER)).status_code == 200
                evil = {"Host": "attacker.example"} | BEARER
                assert (await http.get("/api/overview", headers=evil)).status_code == 403
            assert TOKEN not in proc.output
            proc.proc.terminate()
            assert await proc.proc.wait() == 0
