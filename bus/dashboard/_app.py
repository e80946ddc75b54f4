"""The dashboard as an ASGI application (Starlette routing), and a Trio server for it
(hypercorn in Trio mode)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from actors._log import get_logger
from bus._errors import BrokerClosed
from bus.dashboard._data import ActionRefused, DashboardData
from bus.dashboard._page import CSS, JS, page

if TYPE_CHECKING:
    from bus._broker import Broker

__all__ = ["Dashboard", "app", "serve"]

log = get_logger("bus.dashboard")

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def _json(body: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(body, default=str),
        status_code=status,
        media_type="application/json",
        headers=_HEADERS,
    )


Handler = Callable[[Request], Awaitable[Response]]


def _guarded(fn: Handler) -> Handler:
    """Refusals become JSON errors with their status; a broker that cannot answer
    (Redis away, not running) a 503, logged."""

    @functools.wraps(fn)
    async def wrapper(request: Request) -> Response:
        try:
            return await fn(request)
        except ActionRefused as exc:
            return _json({"error": str(exc)}, exc.status)
        except Exception as exc:
            log.warning("dashboard.request_failed", path=request.url.path, error=repr(exc))
            return _json({"error": f"the broker did not answer: {type(exc).__name__}: {exc}"}, 503)

    return wrapper


def _host_of(scope: Scope) -> str:
    """The host name a request was made to, without its port."""
    for name, value in scope.get("headers") or ():
        if name == b"host":
            host: str = bytes(value).decode("latin-1").strip().lower()
            if host.startswith("["):
                return host[1:].split("]", 1)[0]
            return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return ""


_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def _same_origin(request: Request) -> bool:
    """A browser sends ``Origin`` with a POST: it must be this dashboard's own."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser (curl, a script): CSRF does not apply
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc == host


class Dashboard:
    """The dashboard of ``broker`` as an ASGI application (``await dashboard(scope,
    receive, send)``): mount it in your Trio web service (Starlette ``Mount``, or any
    ASGI router), or run it with :func:`serve`. It reads the broker inside its
    lifetime: enter ``async with broker`` around the server.

    ``allow_actions``: allow requeueing and purging dead letters (each needs
    ``{"confirm": true}`` and a same-origin JSON POST); ``show_payloads``: show task
    arguments, labels and return values (hidden by default); ``sample_interval``
    and ``history``: seconds between the chart's samples and how far back it goes;
    ``refresh``: how often the page polls; ``allowed_hosts``: the host names it
    answers to (``None``, the default here: any; :func:`serve` on a loopback address
    allows only the loopback names). See docs/observability.md for the JSON API.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        allow_actions: bool = False,
        show_payloads: bool = False,
        sample_interval: float = 5.0,
        history: float = 900.0,
        refresh: float = 2.0,
        allowed_hosts: Iterable[str] | None = None,
    ) -> None:
        #: Host names (without port) the dashboard answers to; ``None``: any.
        self.allowed_hosts = None if allowed_hosts is None else frozenset(allowed_hosts)
        self.data = DashboardData(
            broker,
            allow_actions=allow_actions,
            show_payloads=show_payloads,
            sample_interval=sample_interval,
            history=history,
            refresh=refresh,
        )
        self.broker = broker
        routes = [
            Route("/", self._page, methods=["GET"]),
            Route("/static/dashboard.js", self._static(JS, "text/javascript"), methods=["GET"]),
            Route("/static/dashboard.css", self._static(CSS, "text/css"), methods=["GET"]),
            Route("/api/overview", _guarded(self._overview), methods=["GET"]),
            Route("/api/tasks/{task_id}", _guarded(self._task), methods=["GET"]),
            Route("/api/dead", _guarded(self._dead), methods=["GET"]),
            Route("/api/dead/requeue", _guarded(self._requeue), methods=["POST"]),
            Route("/api/dead/purge", _guarded(self._purge), methods=["POST"]),
        ]
        self._app = Starlette(routes=routes, lifespan=self._lifespan)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.allowed_hosts is not None:
            host = _host_of(scope)
            if host not in self.allowed_hosts:
                # A page of another site whose name now points here (DNS rebinding)
                # must not read or act on the dashboard.
                refused = PlainTextResponse(f"unknown host {host!r}", 403, headers=_HEADERS)
                await refused(scope, receive, send)
                return
        await self._app(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.broker.is_running:
            await self.data.start()
        yield

    # ------------------------------------------------------------------ routes

    @staticmethod
    def _static(text: str, media_type: str) -> Handler:
        body = text.encode()

        async def serve_static(request: Request) -> Response:
            return Response(body, media_type=media_type, headers=_HEADERS)

        return serve_static

    async def _page(self, request: Request) -> Response:
        base = request.scope.get("root_path", "").rstrip("/") + "/"
        try:
            data = await self.data.overview()
        except Exception as exc:
            log.warning("dashboard.request_failed", path="/", error=repr(exc))
            return HTMLResponse(
                "<!doctype html><title>bus dashboard</title><p>The broker did not answer; "
                "this page shows nothing until it does. Reload to try again.</p>",
                status_code=503,
                headers=_HEADERS,
            )
        return HTMLResponse(page(base, data), headers=_HEADERS)

    async def _overview(self, request: Request) -> Response:
        return _json(await self.data.overview())

    async def _task(self, request: Request) -> Response:
        return _json(await self.data.task(request.path_params["task_id"]))

    async def _dead(self, request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "50"))
        except ValueError:
            raise ActionRefused(400, "limit must be a whole number") from None
        try:
            return _json(await self.data.dead_letters(max(1, min(limit, 1000))))
        except NotImplementedError as exc:
            raise ActionRefused(501, str(exc)) from None

    async def _body(self, request: Request) -> Any:
        if not self.data.allow_actions:
            raise ActionRefused(403, "this dashboard is read-only (start it with --allow-actions)")
        if not _same_origin(request):
            raise ActionRefused(403, "cross-origin request refused")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ActionRefused(415, "send the action as application/json")
        try:
            return await request.json()
        except ValueError:
            raise ActionRefused(400, "the body is not valid JSON") from None

    async def _requeue(self, request: Request) -> Response:
        return _json(await self.data.requeue(await self._body(request)))

    async def _purge(self, request: Request) -> Response:
        return _json(await self.data.purge(await self._body(request)))


def app(
    broker: Broker,
    *,
    allow_actions: bool = False,
    show_payloads: bool = False,
    **options: Any,
) -> Dashboard:
    """The dashboard of ``broker`` as an ASGI application (see :class:`Dashboard`)."""
    return Dashboard(broker, allow_actions=allow_actions, show_payloads=show_payloads, **options)


async def serve(
    broker: Broker,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    allow_actions: bool = False,
    show_payloads: bool = False,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    allowed_hosts: Iterable[str] | Literal["loopback"] | None = "loopback",
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """Serve the dashboard of the running ``broker`` at ``http://host:port/`` with
    hypercorn in Trio mode, until ``shutdown_trigger`` returns or this is cancelled.
    ``nursery.start`` returns the URLs it listens on (``port=0`` picks a free port).
    Binds to 127.0.0.1 unless told otherwise. ``allowed_hosts``: the host names
    requests may name (``"loopback"``: 127.0.0.1, localhost and ::1 when bound to a
    loopback address, any otherwise; ``None``: any). Its errors are logged through
    the ``logging`` logger ``bus.dashboard.http``; nothing is printed otherwise."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    if not broker.is_running:
        raise BrokerClosed("serve the dashboard inside `async with broker`")
    if allowed_hosts == "loopback":
        allowed_hosts = (
            _LOOPBACK | {host} if host in _LOOPBACK or host == "0:0:0:0:0:0:0:1" else None
        )
    dashboard = app(
        broker,
        allow_actions=allow_actions,
        show_payloads=show_payloads,
        allowed_hosts=allowed_hosts,
        **options,
    )
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("bus.dashboard.http")
    config.graceful_timeout = 1.0
    config.include_server_header = False
    await dashboard.data.start()
    try:
        await hypercorn_serve(
            dashboard,  # type: ignore[arg-type]
            config,
            shutdown_trigger=shutdown_trigger,
            task_status=task_status,
        )
    finally:
        with trio.CancelScope(shield=True):
            await dashboard.data.stop()
