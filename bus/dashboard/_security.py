"""Who may use the dashboard: the host names it answers to, and its optional token.

A web page of another site can make a browser send requests to the dashboard once its
host name resolves to the dashboard's address (DNS rebinding): such requests name that
other site in ``Host``, so the dashboard answers only host names it was told about,
on every address it listens on. The token (``BUS_DASHBOARD_TOKEN`` for ``bus
dashboard``) is asked of every request but the login form and the static files: as
``Authorization: Bearer TOKEN``, as the password of HTTP basic authentication, or
through the login form, which sets a session cookie (HttpOnly, SameSite=Strict)
holding an HMAC of the token and the time of login, not the token itself.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import ipaddress
import os
import re
import socket
import time
from collections.abc import Iterable

__all__ = [
    "ENV_TOKEN",
    "LOOPBACK_NAMES",
    "SESSION_COOKIE",
    "SESSION_SECONDS",
    "TOKEN_FROM_ENV",
    "allowed_hosts_for",
    "allowed_name",
    "canonical_host",
    "check_token",
    "is_loopback",
    "new_session",
    "resolve_token",
    "token_matches",
    "valid_session",
]

#: The environment variable ``bus dashboard`` reads its token from.
ENV_TOKEN = "BUS_DASHBOARD_TOKEN"
#: The host names every dashboard served by ``serve`` answers to: a browser names
#: them only for a page it loaded from this machine's own loopback interface.
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
#: The name of the login form's session cookie.
SESSION_COOKIE = "bus_dashboard_session"
#: How long a login lasts.
SESSION_SECONDS = 12 * 3600
#: The shortest token taken: a guessable token protects nothing.
MIN_TOKEN_LENGTH = 16


class _FromEnv(enum.Enum):
    TOKEN_FROM_ENV = ENV_TOKEN


#: ``serve``'s default token: ``BUS_DASHBOARD_TOKEN`` when it is set, else none.
TOKEN_FROM_ENV = _FromEnv.TOKEN_FROM_ENV

_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space: header-safe
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")


def canonical_host(name: str) -> str:
    """``name`` as the dashboard compares host names: lower case, without brackets
    or a final dot; an IP address in its standard form (``0:0::1`` is ``::1``)."""
    host = name.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.removesuffix(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _numeric_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a numeric ``host`` binds to, as the system reads it (so ``127.1``
    and ``0x7f.1`` are 127.0.0.1); ``None`` for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    return ipaddress.ip_address(str(found[0][4][0]).split("%", 1)[0])


def is_loopback(host: str) -> bool:
    """Whether the dashboard bound to ``host`` is reachable from this machine only:
    ``localhost``, or an address in 127.0.0.0/8 or ``::1`` (``127.1`` and
    ``::ffff:127.0.0.2`` too). Other names are not looked up: they count as exposed."""
    name = canonical_host(host)
    if name == "localhost":
        return True
    address = _numeric_address(name)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address is not None and address.is_loopback


def allowed_name(name: str) -> str:
    """``name`` in canonical form if it can be an allowed host, else ``ValueError``."""
    host = canonical_host(name)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(
                f"allowed host {name!r} is not a host name or an IP address "
                "(give the name alone: no scheme, port or path)"
            ) from None
    return host


def allowed_hosts_for(
    bind: str, allowed: Iterable[str] | None, *, how: str = "allowed_hosts=[...]"
) -> frozenset[str]:
    """The host names a dashboard bound to ``bind`` answers to: ``allowed``, the
    loopback names, and ``bind`` itself when it is a loopback address. A bind that is
    not a loopback address (``0.0.0.0``, a LAN address, a name) needs ``allowed``:
    without it, ``ValueError`` with a one-line reason (``how`` names the option)."""
    names = {allowed_name(a) for a in allowed or ()}
    if is_loopback(bind):
        names.add(canonical_host(bind))
        address = _numeric_address(canonical_host(bind))
        if address is not None:
            names.add(str(address))
    elif names:
        address = _numeric_address(canonical_host(bind))
        if address is not None and not address.is_unspecified:
            names.add(str(address))  # a page loaded from it is the dashboard's own
    else:
        raise ValueError(
            f"the dashboard would listen on {bind!r}, which is not a loopback address: "
            f"name the host names it is reached by with {how}, so that pages of other "
            "sites cannot use it (DNS rebinding)"
        )
    return frozenset(names | LOOPBACK_NAMES)


def check_token(token: str) -> str:
    """``token`` if it can be the dashboard's token, else ``ValueError`` saying why."""
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"the dashboard token must be at least {MIN_TOKEN_LENGTH} characters long "
            "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if not _TOKEN_CHARS.fullmatch(token):
        raise ValueError("the dashboard token must be printable ASCII without spaces")
    return token


def resolve_token(token: str | _FromEnv | None) -> str | None:
    """The token to ask for: ``token``, or with ``TOKEN_FROM_ENV``, the
    environment's ``BUS_DASHBOARD_TOKEN`` (``None`` when unset); ``ValueError``
    when it cannot be a token."""
    if token is TOKEN_FROM_ENV:
        found = os.environ.get(ENV_TOKEN)
        if found is None:
            return None
        try:
            return check_token(found)
        except ValueError as exc:
            raise ValueError(f"{ENV_TOKEN}: {exc}") from None
    assert not isinstance(token, _FromEnv)
    return None if token is None else check_token(token)


def token_matches(token: str, authorization: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``token``: ``Bearer TOKEN``, or
    basic authentication with ``TOKEN`` as the password (any user name). Compared in
    constant time."""
    if not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        value = decoded.partition(":")[2]
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode(), token.encode())


def _session_mac(token: str, issued: int) -> str:
    msg = f"bus-dashboard-session:{issued}".encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def new_session(token: str, now: float | None = None) -> str:
    """The value of a session cookie issued now."""
    issued = int(time.time() if now is None else now)
    return f"{issued}.{_session_mac(token, issued)}"


def valid_session(token: str, cookie: str | None, now: float | None = None) -> bool:
    """Whether ``cookie`` is a session of ``token`` issued less than
    ``SESSION_SECONDS`` ago."""
    if not cookie:
        return False
    issued_text, _, mac = cookie.partition(".")
    if not issued_text.isdigit() or len(issued_text) > 12:
        return False
    issued = int(issued_text)
    age = (time.time() if now is None else now) - issued
    if not -60 <= age < SESSION_SECONDS:  # a minute of skew between dashboards
        return False
    return hmac.compare_digest(mac.encode(), _session_mac(token, issued).encode())
