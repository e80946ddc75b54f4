"""Secrets stay secret (issue 18, item 6): the signing secret is never shown and is long
enough; a password is hidden however it is written; nothing derived from a password
names an actor."""

from __future__ import annotations

import hashlib
import re

import attrs
import pytest

from bus.redis import RedisBroker
from bus.redis._pool import _actor_name
from bus.redis._settings import RedisSettings
from bus.redis._url import RedisURL
from tests.security.support import SECRET


def test_repr_hides_the_secret() -> None:
    settings = RedisSettings(secret=SECRET)
    assert settings.secret == SECRET.encode()
    assert SECRET not in repr(settings) and "secret=" not in repr(settings)
    broker = RedisBroker("redis://127.0.0.1:6390/0", secret=SECRET)
    assert SECRET not in repr(broker) and SECRET not in repr(broker.settings)
    assert SECRET not in str(broker.describe())


@pytest.mark.parametrize("secret", ["", "k", b"s3cret", "x" * 31, b"\0" * 31])
def test_a_secret_shorter_than_32_bytes_is_refused(secret: str | bytes) -> None:
    with pytest.raises(ValueError, match="secret must be at least 32 bytes long") as caught:
        RedisSettings(secret=secret)
    if len(secret) > 3:
        assert str(secret)[1:] not in str(caught.value)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        RedisBroker("redis://127.0.0.1:6390/0", secret=secret)


def test_a_secret_of_32_bytes_or_more_is_taken() -> None:
    assert RedisSettings(secret="é" * 16).secret == ("é" * 16).encode()  # 32 bytes in UTF-8
    assert RedisSettings(secret=b"k" * 32).secret == b"k" * 32
    assert RedisSettings(secret=None).secret is None
    with pytest.raises(TypeError):
        RedisSettings(secret=32)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter/2x9@example.org:6380/0",  # printed whole before
        "redis://admin:hunter/2x9@example.org:6380/0",
        "redis://:hunter?2x9@example.org/0",
        "redis://:hunter#2x9@example.org/0",
        "redis://:hunter@2x9/x@example.org/0",
        "rediss://:hunter/2x9@example.org:6380/0?ssl_cert_reqs=none",
        "unix://:hunter/2x9@/tmp/redis.sock",
        "redis://:hunter/2x9@example.org:notaport/0",
        "redis://:hunter/2x9@example.org:6380/0?bogus=1",
    ],
)
def test_a_password_is_masked_in_errors_however_it_is_written(url: str) -> None:
    with pytest.raises(ValueError, match=r"\*\*\*") as caught:
        RedisURL.parse(url)
    text = str(caught.value)
    assert "hunter" not in text and "2x9" not in text, text
    assert "***" in text
    with pytest.raises(ValueError, match=r"\*\*\*") as again:
        RedisBroker(url)
    assert "hunter" not in str(again.value) and "2x9" not in str(again.value)


def test_an_encoded_password_is_taken_and_never_shown() -> None:
    url = RedisURL.parse("redis://admin:hunter%2F2x9%40%3F@example.org:6380/1")
    assert url.password == "hunter/2x9@?"
    for text in (str(url), repr(url), url.redacted()):
        assert "hunter" not in text and "2x9" not in text
    assert str(url) == "redis://admin:***@example.org:6380/1"


def test_connection_actor_names_carry_nothing_of_the_password() -> None:
    one = RedisURL.parse("redis://:hunter2@example.org:6380/1")
    other = RedisURL.parse("redis://:hunter3@example.org:6380/1")
    names = [_actor_name(one), _actor_name(other)]
    assert names[0] != names[1]  # two connections, as before
    assert names[0] == _actor_name(RedisURL.parse("redis://:hunter2@example.org:6380/1"))
    for url, name in zip((one, other), names, strict=True):
        assert re.fullmatch(r"redis example\.org:6380/1 #\d+", name), name
        digest = hashlib.sha1(repr(attrs.astuple(url)).encode()).hexdigest()
        assert digest[:8] not in name
        assert "hunter" not in name
