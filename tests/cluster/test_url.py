"""Cluster and Sentinel URLs: parsed, validated as redis:// is, password masked."""

from __future__ import annotations

import pytest

from bus.redis import RedisBroker, RedisResultBackend
from bus.redis._url import RedisURL


def test_cluster_seeds_and_options() -> None:
    url = RedisURL.parse("redis+cluster://a:7000,b:7001,[::1]?command_timeout=2")
    assert url.is_cluster and not url.is_sentinel and url.scheme == "redis+cluster"
    assert url.seeds == (("a", 7000), ("b", 7001), ("::1", 6379))
    assert (url.host, url.port, url.db, url.command_timeout) == ("a", 7000, 0, 2.0)
    assert url.redacted() == "redis+cluster://a:7000,b:7001,[::1]:6379?command_timeout=2.0"
    assert RedisURL.parse(url.redacted()) == url
    assert RedisURL.parse("redis+cluster://a:1/0").db == 0


def test_sentinel_service_db_and_default_port() -> None:
    url = RedisURL.parse("redis+sentinel://s1,s2:26380/my%20master/3")
    assert url.is_sentinel and url.scheme == "redis+sentinel"
    assert url.seeds == (("s1", 26379), ("s2", 26380))
    assert (url.service, url.db) == ("my master", 3)
    assert url.redacted() == "redis+sentinel://s1:26379,s2:26380/my%20master/3"
    assert RedisURL.parse(url.redacted()) == url
    assert RedisURL.parse("redis+sentinel://s1/m?db=2").db == 2
    node = url.node("10.0.0.5", 6390)
    assert (node.host, node.port, node.db, node.mode, node.seeds) == ("10.0.0.5", 6390, 3, None, ())


def test_tls_variants_take_the_ssl_options() -> None:
    for scheme in ("rediss+cluster", "rediss+sentinel"):
        path = "/m" if "sentinel" in scheme else ""
        url = RedisURL.parse(f"{scheme}://h:1{path}?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem")
        assert url.tls and url.scheme == scheme and url.ssl_cert_reqs == "none"
        assert RedisURL.parse(url.redacted()) == url
    with pytest.raises(ValueError, match="only for rediss://"):
        RedisURL.parse("redis+cluster://h:1?ssl_cert_reqs=none")


def test_passwords_are_masked_everywhere() -> None:
    for text in (
        "redis+cluster://user:s3cr%40t@a:1,b:2",
        "rediss+sentinel://:s3cr%40t@s1,s2/m/1",
    ):
        url = RedisURL.parse(text)
        assert url.password == "s3cr@t"
        for shown in (str(url), repr(url), url.redacted()):
            assert "s3cr" not in shown
    with pytest.raises(ValueError, match="unknown option") as info:
        RedisURL.parse("redis+cluster://user:s3cret@a:1?typo=1")
    assert "s3cret" not in str(info.value) and "typo" in str(info.value)
    with pytest.raises(ValueError, match="percent-encoded") as info:
        RedisURL.parse("redis+sentinel://:pa/ss@s1/m")
    assert "pa/ss" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("redis+cluster://", "at least one host"),
        ("redis+cluster://a:1/3", "db 0 only"),
        ("redis+cluster://a:1,a:1", "given twice"),
        ("redis+cluster://a:0", "bad port"),
        ("redis+cluster://a:x", "bad port"),
        ("redis+cluster://a:", "bad port"),
        ("redis+cluster://a:1,,b:2", "empty host"),
        ("redis+cluster://a:1?commandtimeout=1", "unknown option 'commandtimeout'"),
        ("redis+cluster://a:1?command_timeout=0", "must be > 0"),
        ("redis+cluster://a:1#frag", "fragment"),
        ("redis+sentinel://s1", "name of the master"),
        ("redis+sentinel://s1/", "name of the master"),
        ("redis+sentinel://s1/m/x", "db number"),
        ("redis+sentinel://s1/m/1/2", "service_name"),
        ("redis+sentinel://s1/m/1?db=2", "two different db"),
        ("redis+sentinel://u@s1/m", "needs a password"),
        ("redis+sentinal://s1/m", "unknown scheme"),
    ],
)
def test_bad_urls_are_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RedisURL.parse(text)


def test_the_broker_and_the_backend_take_them() -> None:
    broker = RedisBroker("redis+sentinel://:pw@s1,s2/m/2", min_replicas_ack=1)
    assert broker.settings.url.service == "m" and broker.settings.min_replicas_ack == 1
    backend = RedisResultBackend("redis+cluster://a:1,b:2", min_replicas_ack=1)
    assert backend.url.is_cluster and backend.min_replicas_ack == 1
    with pytest.raises(ValueError, match="min_replicas_ack"):
        RedisResultBackend("redis://h", min_replicas_ack=-1)
    with pytest.raises(ValueError, match="min_replicas_ack"):
        RedisBroker("redis://h", min_replicas_ack=-1)
