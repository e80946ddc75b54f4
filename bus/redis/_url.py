"""Where a Redis server is and how to talk to it: :class:`RedisURL`.

Accepted forms::

    redis://[[username]:password@]host[:port][/db][?option=value&...]
    rediss://...                  (the same, over TLS)
    unix://[[username]:password@]path/to/socket[?db=N&...]
    unix:///absolute/path/to/socket?db=2
    redis+cluster://[[username]:password@]host:port[,host:port...][?option=value&...]
    redis+sentinel://[[username]:password@]host:port[,host:port...]/service_name[/db][?...]
    rediss+cluster://..., rediss+sentinel://...   (the same, over TLS)

A cluster URL names seed nodes (any reachable master or replica of the cluster; db 0
only); a sentinel URL names the sentinels (default port 26379) and the name of the
master they monitor. The user and password are those of the Redis nodes (the
sentinels are asked without them).

Options: ``db`` (also as the path ``/3`` for redis/rediss), ``connect_timeout`` and
``command_timeout`` (seconds, floats > 0, ``inf`` allowed), ``max_reply_bytes`` (the
largest reply the client accepts, an integer >= 1024: a larger one drops the
connection, default 256 MiB), and for ``rediss://`` only
``ssl_cert_reqs`` (``required`` | ``optional`` | ``none``) and ``ssl_ca_certs`` (a PEM
file). Anything else is an error: a typo in an option never passes silently.
"""

from __future__ import annotations

import math
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import attrs

__all__ = [
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_REPLY_BYTES",
    "RedisURL",
]

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_COMMAND_TIMEOUT = 30.0
#: The largest reply the client buffers (a larger one is a connection error).
DEFAULT_MAX_REPLY_BYTES = 256 * 1024 * 1024

_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)
_SCHEME_LIST = "redis://, rediss://, unix://, redis+cluster://, redis+sentinel:// (or rediss+...)"
#: The port of a seed written without one.
_DEFAULT_PORTS = {"cluster": 6379, "sentinel": 26379}
_CERT_REQS = ("required", "optional", "none")
_OPTIONS = (
    "db",
    "connect_timeout",
    "command_timeout",
    "max_reply_bytes",
    "ssl_cert_reqs",
    "ssl_ca_certs",
)


def _mask(text: str) -> str:
    """``text`` (a URL) with its password replaced by ``***``, however it is written:
    the user info is taken as everything between ``://`` and the *last* ``@``, so a
    password holding an unencoded ``/``, ``?``, ``#``, ``:`` or ``@`` is hidden whole
    (an ``@`` later in the URL hides more than the password, never less)."""
    scheme, sep, rest = text.partition("://")
    userinfo, at, tail = rest.rpartition("@")
    if not (sep and at):
        return text
    user, colon, _ = userinfo.partition(":")
    if not colon or "/" in user or "?" in user or "#" in user:
        return f"{scheme}://***@{tail}"  # no telling the user from a password
    return f"{scheme}://{user}:***@{tail}"


def _hidden(password: str | None) -> str:
    return "None" if password is None else "'***'"


def _seconds(name: str, value: str, where: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, not {value!r} in {where}") from None
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be > 0 seconds, not {value!r} in {where}")
    return seconds


def _db(value: str, where: str) -> int:
    if not value.isdigit():
        raise ValueError(f"the db number must be an integer >= 0, not {value!r} in {where}")
    return int(value)


def _options(
    query: list[tuple[str, str]], scheme: str, where: str, fields: dict[str, object], db: int | None
) -> int | None:
    """Check the query options into ``fields``; return the db number (``db`` is the
    one the path gave, if any)."""
    seen: set[str] = set()
    for name, value in query:
        if name not in _OPTIONS:
            raise ValueError(f"unknown option {name!r} in {where} (known: {', '.join(_OPTIONS)})")
        if name in seen:
            raise ValueError(f"option {name!r} given twice in {where}")
        seen.add(name)
        if name == "db":
            query_db = _db(value, where)
            if db is not None and db != query_db:
                raise ValueError(f"two different db numbers in {where}")
            db = query_db
        elif name in ("connect_timeout", "command_timeout"):
            fields[name] = _seconds(name, value, where)
        elif name == "max_reply_bytes":
            if not value.isdigit() or len(value) > 15 or int(value) < 1024:
                raise ValueError(
                    f"max_reply_bytes must be an integer >= 1024, not {value!r} in {where}"
                )
            fields[name] = int(value)
        else:
            if not scheme.startswith("rediss"):
                raise ValueError(f"{name} is only for rediss:// URLs: {where}")
            if name == "ssl_cert_reqs" and value not in _CERT_REQS:
                raise ValueError(
                    f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, "
                    f"not {value!r} in {where}"
                )
            if not value:
                raise ValueError(f"{name} is empty in {where}")
            fields[name] = value
    return db


def _seed(text: str, default_port: int, where: str) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` of a seed list."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad host {text!r} in {where}")
        port_text = rest[1:] if rest else ""
    else:
        host, colon, port_text = text.partition(":")
        if colon and not port_text:
            raise ValueError(f"bad port in {where}: empty")
    if not host:
        raise ValueError(f"an empty host in the host list of {where}")
    if not port_text:
        return unquote(host), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {where}: {port_text!r}")
    return unquote(host), int(port_text)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@attrs.frozen(repr=True)
class RedisURL:
    """A parsed Redis URL. Build one with :meth:`parse`; ``str()`` and ``repr()`` never
    show the password (``str(url) == url.redacted()``)."""

    host: str = "localhost"
    port: int = 6379
    #: The unix socket's path (``unix://``); then ``host`` and ``port`` are unused.
    path: str | None = None
    tls: bool = False
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=_hidden)
    db: int = 0
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    #: The largest reply accepted (bytes); a larger one drops the connection.
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    ssl_cert_reqs: str = "required"
    ssl_ca_certs: str | None = None
    #: ``"cluster"`` or ``"sentinel"`` for those URLs (``None``: one server).
    mode: str | None = None
    #: The cluster's seed nodes or the sentinels, in the URL's order (``host``/``port``
    #: are the first of them).
    seeds: tuple[tuple[str, int], ...] = ()
    #: The name of the master the sentinels monitor (``redis+sentinel://`` only).
    service: str | None = None

    @property
    def scheme(self) -> str:
        if self.path is not None:
            return "unix"
        base = "rediss" if self.tls else "redis"
        return f"{base}+{self.mode}" if self.mode else base

    @property
    def is_cluster(self) -> bool:
        return self.mode == "cluster"

    @property
    def is_sentinel(self) -> bool:
        return self.mode == "sentinel"

    def node(self, host: str, port: int) -> RedisURL:
        """This URL's credentials and options for one server at ``host:port`` (a
        cluster node, the master a sentinel named)."""
        return attrs.evolve(self, host=host, port=port, mode=None, seeds=(), service=None)

    @classmethod
    def _parse_many(cls, text: str, scheme: str, where: str) -> RedisURL:
        """A cluster or sentinel URL: a list of ``host:port``, then the path."""
        base, _, mode = scheme.partition("+")
        rest = text.partition("://")[2]
        rest, hash_, _ = rest.partition("#")
        if hash_:
            raise ValueError(f"a Redis URL has no #fragment: {where}")
        rest, _, query_text = rest.partition("?")
        userinfo, at, rest = rest.rpartition("@")
        if "@" in query_text or (at and ("/" in userinfo or "?" in userinfo)):
            raise ValueError(
                f"a password with '/', '?', '#' or '@' in it must be percent-encoded "
                f"(urllib.parse.quote(password, safe='')): {where}"
            )
        hostlist, slash, path = rest.partition("/")
        try:
            query = parse_qsl(query_text, keep_blank_values=True, strict_parsing=bool(query_text))
        except ValueError:
            raise ValueError(f"malformed query string in {where}") from None
        fields: dict[str, object] = {"tls": base == "rediss", "mode": mode}
        if at:
            user, colon, secret = userinfo.partition(":")
            fields["username"] = username = unquote(user) or None
            fields["password"] = password = unquote(secret) if colon and secret else None
            if username is not None and password is None:
                raise ValueError(f"a username needs a password (user:password@) in {where}")
        if not hostlist:
            raise ValueError(f"a {scheme}:// URL needs at least one host:port: {where}")
        seeds = tuple(_seed(item, _DEFAULT_PORTS[mode], where) for item in hostlist.split(","))
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"a host:port given twice in {where}")
        fields["seeds"] = seeds
        fields["host"], fields["port"] = seeds[0]
        db: int | None = None
        segments = [unquote(p) for p in path.split("/")] if slash else []
        if segments and segments[-1] == "":
            segments.pop()  # a trailing slash
        if mode == "sentinel":
            if not segments or not segments[0]:
                raise ValueError(
                    f"a sentinel URL needs the name of the master: "
                    f"{scheme}://host:port/service_name[/db] ({where})"
                )
            fields["service"] = segments[0]
            if len(segments) > 2:
                raise ValueError(f"a sentinel URL's path is /service_name[/db]: {where}")
            if len(segments) == 2:
                db = _db(segments[1], where)
        elif segments:
            if len(segments) > 1:
                raise ValueError(f"a cluster URL's path is at most /0: {where}")
            db = _db(segments[0], where)
        db = _options(query, scheme, where, fields, db)
        if mode == "cluster" and db:
            raise ValueError(f"a Redis Cluster has db 0 only, not {db} in {where}")
        if db is not None:
            fields["db"] = db
        return cls(**fields)  # type: ignore[arg-type]

    @classmethod
    def parse(cls, text: str) -> RedisURL:
        """Parse ``text``; raise :class:`ValueError` naming what is wrong (the message
        shows the URL with its password masked)."""
        where = _mask(text)
        scheme, sep, _ = text.partition("://")
        if not sep:
            raise ValueError(f"a Redis URL needs a scheme ({_SCHEME_LIST}): {where}")
        if scheme.lower() not in _SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r} in {where} (expected {_SCHEME_LIST})")
        scheme = scheme.lower()
        if "+" in scheme:
            return cls._parse_many(text, scheme, where)
        parts = urlsplit(text)
        if "@" in parts.path + parts.query + parts.fragment:
            # An '@' the parser did not see as the end of the user info: a password
            # holding an unencoded '/', '?' or '#'. Never guessed, never shown.
            raise ValueError(
                f"a password with '/', '?', '#' or '@' in it must be percent-encoded "
                f"(urllib.parse.quote(password, safe='')), or '@' in a path: {where}"
            )
        if parts.fragment:
            raise ValueError(f"a Redis URL has no #fragment: {where}")
        try:
            query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError:
            raise ValueError(f"malformed query string in {where}") from None

        userinfo, at, hostpart = parts.netloc.rpartition("@")
        username: str | None = None
        password: str | None = None
        if at:
            user, colon, secret = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if colon and secret else None
            if username is not None and password is None:
                raise ValueError(f"a username needs a password (user:password@) in {where}")

        fields: dict[str, object] = {"username": username, "password": password}
        db: int | None = None
        if scheme == "unix":
            socket_path = unquote(hostpart + parts.path)
            if not socket_path:
                raise ValueError(f"a unix:// URL needs a socket path: {where}")
            fields["path"] = socket_path
        else:
            fields["tls"] = scheme == "rediss"
            try:
                port = parts.port
            except ValueError as exc:
                raise ValueError(f"bad port in {where}: {exc}") from None
            if port == 0:
                raise ValueError(f"bad port in {where}: 0")
            if hostpart.endswith(":"):
                raise ValueError(f"bad port in {where}: empty")
            if parts.hostname:
                fields["host"] = unquote(parts.hostname)
            if port is not None:
                fields["port"] = port
            db_path = parts.path.strip("/")
            if db_path:
                db = _db(db_path, where)

        db = _options(query, scheme, where, fields, db)
        if db is not None:
            fields["db"] = db
        return cls(**fields)  # type: ignore[arg-type]

    def redacted(self) -> str:
        """The URL as text with the password replaced by ``***`` (for logs)."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:***@"
        options: dict[str, str] = {}
        if self.path is not None:
            location = quote(self.path)
            if self.db:
                options["db"] = str(self.db)
        elif self.mode is not None:
            hosts = ",".join(f"{_host(host)}:{port}" for host, port in self.seeds)
            if self.mode == "sentinel":
                location = f"{hosts}/{quote(self.service or '', safe='')}/{self.db}"
            else:
                location = hosts
        else:
            location = f"{_host(self.host)}:{self.port}/{self.db}"
        if self.connect_timeout != DEFAULT_CONNECT_TIMEOUT:
            options["connect_timeout"] = repr(self.connect_timeout)
        if self.command_timeout != DEFAULT_COMMAND_TIMEOUT:
            options["command_timeout"] = repr(self.command_timeout)
        if self.max_reply_bytes != DEFAULT_MAX_REPLY_BYTES:
            options["max_reply_bytes"] = str(self.max_reply_bytes)
        if self.tls and self.ssl_cert_reqs != "required":
            options["ssl_cert_reqs"] = self.ssl_cert_reqs
        if self.tls and self.ssl_ca_certs is not None:
            options["ssl_ca_certs"] = self.ssl_ca_certs
        query = f"?{urlencode(options)}" if options else ""
        return f"{self.scheme}://{auth}{location}{query}"

    def __str__(self) -> str:
        return self.redacted()
