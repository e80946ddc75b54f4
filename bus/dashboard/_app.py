"""The dashboard as an ASGI application (Starlette routing), and a Trio server for it
(hypercorn in Trio mode)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from actors._log import get_logger
from bus._errors import BrokerClosed
from bus.dashboard._data import ActionRefused, DashboardData
from bus.dashboard._page import CSS, JS, login_page, page
from bus.dashboard._security import (
    SESSION_COOKIE,
    SESSION_SECONDS,
    TOKEN_FROM_ENV,
    _FromEnv,
    allowed_hosts_for,
    allowed_name,
    canonical_host,
    check_token,
    is_loopback,
    new_session,
    resolve_token,
    token_matches,
    valid_session,
)

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
    # Not "no-referrer": with it a form sends "Origin: null", which the CSRF check refuses.
    "Referrer-Policy": "same-origin",
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
    """The host name a request was made to, without its port, in canonical form."""
    for name, value in scope.get("headers") or ():
        if name == b"host":
            host: str = bytes(value).decode("latin-1").strip().lower()
            if host.startswith("["):
                return canonical_host(host[1:].split("]", 1)[0])
            return canonical_host(host.rsplit(":", 1)[0] if host.count(":") == 1 else host)
    return ""


def _same_origin(request: Request) -> bool:
    """A browser sends ``Origin`` with a POST: it must be this dashboard's own (and
    ``Sec-Fetch-Site``, when sent, must say so too)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser (curl, a script): CSRF does not apply
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc == host


def _names(hosts: Iterable[str] | str | None) -> Iterable[str] | None:
    return [hosts] if isinstance(hosts, str) else hosts


#: What a 401 says: a scheme browsers do not prompt for (the page shows its form).
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="bus dashboard"'}


def _base(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/") + "/"


#: The largest login form body read.
_MAX_LOGIN_BODY = 4096


class Dashboard:
    """The dashboard of ``broker`` as an ASGI application (``await dashboard(scope,
    receive, send)``): mount it in your Trio web service (Starlette ``Mount``, or any
    ASGI router), or run it with :func:`serve`. It reads the broker inside its
    lifetime: enter ``async with broker`` around the server.

    ``allow_actions``: allow requeueing and purging dead letters (each needs
    ``{"confirm": true}`` and a same-origin JSON POST); ``show_payloads``: show task
    arguments, labels and return values (hidden by default); ``sample_interval``
    and ``history``: seconds between the chart's samples and how far back it goes;
    ``refresh``: how often the page polls.

    ``allowed_hosts``: the host names (without port) requests may name in ``Host``;
    others get a 403 (``None``, the default here: any, for your service's router
    decides; :func:`serve` always names them). ``token``: when set, every request
    but the login form and the static files must carry it, as ``Authorization:
    Bearer TOKEN``, as the password of HTTP basic authentication, or in the session
    cookie the login form sets; others get a 401 (the page answers with the login
    form). At least 16 printable characters. See docs/observability.md.
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
        allowed_hosts: Iterable[str] | str | None = None,
        token: str | None = None,
    ) -> None:
        names = _names(allowed_hosts)
        #: Host names (without port) the dashboard answers to; ``None``: any.
        self.allowed_hosts = None if names is None else frozenset(map(allowed_name, names))
        self._token = None if token is None else check_token(token)
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
            Route("/login", self._login, methods=["POST"]),
            Route("/logout", self._logout, methods=["POST"]),
            Route("/static/dashboard.js", self._static(JS, "text/javascript"), methods=["GET"]),
            Route("/static/dashboard.css", self._static(CSS, "text/css"), methods=["GET"]),
            Route("/api/overview", self._api(self._overview), methods=["GET"]),
            Route("/api/tasks/{task_id}", self._api(self._task), methods=["GET"]),
            Route("/api/workflows/{workflow_id}", self._api(self._workflow), methods=["GET"]),
            Route("/api/dead", self._api(self._dead), methods=["GET"]),
            Route("/api/dead/requeue", self._api(self._requeue), methods=["POST"]),
            Route("/api/dead/purge", self._api(self._purge), methods=["POST"]),
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

    @property
    def token_required(self) -> bool:
        """Whether requests must carry the token."""
        return self._token is not None

    def _authenticated(self, request: Request) -> bool:
        if self._token is None:
            return True
        return token_matches(self._token, request.headers.get("authorization")) or (
            valid_session(self._token, request.cookies.get(SESSION_COOKIE))
        )

    def _api(self, fn: Handler) -> Handler:
        guarded = _guarded(fn)

        @functools.wraps(fn)
        async def api(request: Request) -> Response:
            if not self._authenticated(request):
                refused = _json({"error": "this dashboard asks for its token"}, 401)
                refused.headers.update(_CHALLENGE)
                return refused
            return await guarded(request)

        return api

    # ------------------------------------------------------------------ routes

    @staticmethod
    def _static(text: str, media_type: str) -> Handler:
        body = text.encode()

        async def serve_static(request: Request) -> Response:
            return Response(body, media_type=media_type, headers=_HEADERS)

        return serve_static

    async def _page(self, request: Request) -> Response:
        base = _base(request)
        if not self._authenticated(request):
            return HTMLResponse(login_page(base), 401, headers=_HEADERS | _CHALLENGE)
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
        cookie = self._token is not None and SESSION_COOKIE in request.cookies
        return HTMLResponse(page(base, data, logout=cookie), headers=_HEADERS)

    async def _login(self, request: Request) -> Response:
        """The login form's POST: the right token sets the session cookie."""
        base = _base(request)
        if self._token is None:
            return RedirectResponse(base, 303, headers=_HEADERS)
        if not _same_origin(request):
            return PlainTextResponse("cross-origin request refused", 403, headers=_HEADERS)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_LOGIN_BODY:
                return PlainTextResponse("the form is too large", 413, headers=_HEADERS)
        try:
            form = parse_qs(body.decode("latin-1"), max_num_fields=4)
        except ValueError:
            return PlainTextResponse("too many form fields", 400, headers=_HEADERS)
        given = (form.get("token") or [""])[0]
        if not token_matches(self._token, f"Bearer {given}"):
            client = request.client.host if request.client else None
            log.warning("dashboard.login_refused", client=client)
            wrong = login_page(base, wrong=True)
            return HTMLResponse(wrong, 401, headers=_HEADERS | _CHALLENGE)
        done = RedirectResponse(base, 303, headers=_HEADERS)
        done.set_cookie(
            SESSION_COOKIE,
            new_session(self._token),
            max_age=SESSION_SECONDS,
            path=base,
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return done

    async def _logout(self, request: Request) -> Response:
        base = _base(request)
        if not _same_origin(request):
            return PlainTextResponse("cross-origin request refused", 403, headers=_HEADERS)
        done = RedirectResponse(base, 303, headers=_HEADERS)
        done.delete_cookie(SESSION_COOKIE, path=base, httponly=True, samesite="strict")
        return done

    async def _overview(self, request: Request) -> Response:
        return _json(await self.data.overview())

    async def _task(self, request: Request) -> Response:
        return _json(await self.data.task(request.path_params["task_id"]))

    async def _workflow(self, request: Request) -> Response:
        return _json(await self.data.workflow(request.path_params["workflow_id"]))

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
    allowed_hosts: Iterable[str] | str | None = None,
    token: str | _FromEnv | None = TOKEN_FROM_ENV,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """Serve the dashboard of the running ``broker`` at ``http://host:port/`` with
    hypercorn in Trio mode, until ``shutdown_trigger`` returns or this is cancelled.
    ``nursery.start`` returns the URLs it listens on (``port=0`` picks a free port).
    Binds to 127.0.0.1 unless told otherwise.

    Requests must name in ``Host`` one of ``allowed_hosts``, the loopback names
    (127.0.0.1, localhost, ::1) or ``host`` itself when it is a loopback address
    (127.0.0.0/8, ::1, localhost); others get a 403, whatever the address. A
    ``host`` that is not a loopback address (``0.0.0.0``, a LAN address, a name)
    needs ``allowed_hosts``: without, ``ValueError`` before anything starts.
    ``token``: the token every request must carry (see :class:`Dashboard`); by
    default the environment's ``BUS_DASHBOARD_TOKEN`` when it is set, as for ``bus
    dashboard`` (``token=None``: no token, whatever the environment says).
    Its errors are logged through the ``logging`` logger ``bus.dashboard.http``;
    nothing is printed otherwise."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    if not broker.is_running:
        raise BrokerClosed("serve the dashboard inside `async with broker`")
    if allowed_hosts == "loopback":  # what this argument once meant: the default
        allowed_hosts = None
    names = allowed_hosts_for(host, _names(allowed_hosts))
    token_text = resolve_token(token)
    dashboard = app(
        broker,
        allow_actions=allow_actions,
        show_payloads=show_payloads,
        allowed_hosts=names,
        token=token_text,
        **options,
    )
    if token_text is None and not is_loopback(host):
        log.warning(
            "dashboard.no_token",
            host=host,
            hint="anyone who reaches this address can read the dashboard: set a token",
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
