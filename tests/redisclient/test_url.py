"""RedisURL parsing (no server needed)."""

from __future__ import annotations

import math

import pytest

from bus.redis._url import DEFAULT_COMMAND_TIMEOUT, RedisURL


def test_defaults() -> None:
    url = RedisURL.parse("redis://")
    assert (url.host, url.port, url.db, url.tls, url.path) == ("localhost", 6379, 0, False, None)
    assert url.password is None and url.username is None
    assert url.command_timeout == DEFAULT_COMMAND_TIMEOUT


def test_host_port_db_and_options() -> None:
    url = RedisURL.parse("redis://example.org:6380/3?connect_timeout=1.5&command_timeout=2")
    assert (url.host, url.port, url.db) == ("example.org", 6380, 3)
    assert (url.connect_timeout, url.command_timeout) == (1.5, 2.0)
    assert RedisURL.parse("redis://h?db=4").db == 4
    assert RedisURL.parse("redis://h/4?db=4").db == 4
    assert RedisURL.parse("redis://h/?command_timeout=inf").command_timeout == math.inf


def test_ipv6_host() -> None:
    url = RedisURL.parse("redis://[::1]:7000/1")
    assert (url.host, url.port) == ("::1", 7000)
    assert url.redacted() == "redis://[::1]:7000/1"


def test_credentials_are_url_decoded_and_never_shown() -> None:
    url = RedisURL.parse("redis://al%40ce:p%3Ass%2Fw0rd@h:1/2")
    assert (url.username, url.password) == ("al@ce", "p:ss/w0rd")
    for text in (str(url), repr(url), url.redacted()):
        assert "p:ss" not in text and "p%3Ass" not in text and "w0rd" not in text
    assert url.redacted() == "redis://al%40ce:***@h:1/2"
    assert str(url) == url.redacted()
    only_password = RedisURL.parse("redis://:secret@h")
    assert (only_password.username, only_password.password) == (None, "secret")
    assert only_password.redacted() == "redis://:***@h:6379/0"


def test_tls_and_its_options() -> None:
    url = RedisURL.parse("rediss://h:6390?ssl_cert_reqs=none&ssl_ca_certs=/tmp/ca.pem")
    assert url.tls and url.scheme == "rediss"
    assert (url.ssl_cert_reqs, url.ssl_ca_certs) == ("none", "/tmp/ca.pem")
    assert url.redacted() == "rediss://h:6390/0?ssl_cert_reqs=none&ssl_ca_certs=%2Ftmp%2Fca.pem"
    assert RedisURL.parse(url.redacted()) == url


def test_unix_sockets() -> None:
    absolute = RedisURL.parse("unix:///var/run/redis.sock?db=2")
    assert (absolute.path, absolute.db, absolute.scheme) == ("/var/run/redis.sock", 2, "unix")
    assert absolute.redacted() == "unix:///var/run/redis.sock?db=2"
    relative = RedisURL.parse("unix://run/redis.sock")
    assert relative.path == "run/redis.sock"
    with_password = RedisURL.parse("unix://:pw@/tmp/r.sock")
    assert (with_password.path, with_password.password) == ("/tmp/r.sock", "pw")
    assert with_password.redacted() == "unix://:***@/tmp/r.sock"


def test_redacted_round_trips_without_the_password() -> None:
    url = RedisURL.parse("redis://u:pw@h:1/5?command_timeout=0.5")
    again = RedisURL.parse(url.redacted())
    assert again.password == "***"
    assert (again.host, again.port, again.db, again.command_timeout) == ("h", 1, 5, 0.5)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("localhost:6379", "needs a scheme"),
        ("http://h", "unknown scheme 'http'"),
        ("redis://h:port", "bad port"),
        ("redis://h:99999", "bad port"),
        ("redis://h:0", "bad port"),
        ("redis://h:", "bad port"),
        ("redis://h/x", "db number must be an integer"),
        ("redis://h/-1", "db number must be an integer"),
        ("redis://h?db=one", "db number must be an integer"),
        ("redis://h/1?db=2", "two different db numbers"),
        ("redis://h?timeout=1", "unknown option 'timeout'"),
        ("redis://h?db=1&db=1", "given twice"),
        ("redis://h?command_timeout=soon", "must be a number of seconds"),
        ("redis://h?command_timeout=0", "must be > 0"),
        ("redis://h?connect_timeout=nan", "must be > 0"),
        ("redis://h?ssl_cert_reqs=none", "only for rediss://"),
        ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
        ("unix://", "needs a socket path"),
        ("redis://user@h", "username needs a password"),
        ("redis://h#frag", "no #fragment"),
        ("redis://h?db", "malformed query"),
        ("redis://h?=x", "unknown option ''"),
    ],
)
def test_malformed_urls_say_what_is_wrong(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        RedisURL.parse(text)


def test_errors_never_show_the_password() -> None:
    with pytest.raises(ValueError, match="bad port") as info:
        RedisURL.parse("redis://u:hunter2@h:x")
    assert "hunter2" not in str(info.value)
    assert "u:***@" in str(info.value)
