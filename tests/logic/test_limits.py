"""Rate and concurrency limits: parsing, the token bucket, leases, and the Redis scripts."""

from __future__ import annotations

import math

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus._limits import (
    Limit,
    Rate,
    RunningTable,
    TokenBucket,
    limit,
    parse_rate,
    task_limit,
)
from bus.redis._limits import (
    ACQUIRE_SLOT_LUA,
    REFRESH_SLOT_LUA,
    RELEASE_SLOT_LUA,
    TOKEN_BUCKET_LUA,
    bucket_args,
    limit_redis_key,
    running_redis_key,
)

# --- rates ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "per"),
    [
        ("100/s", 100, 1),
        ("10/m", 10, 60),
        ("5/h", 5, 3600),
        ("1/d", 1, 86400),
        ("100/second", 100, 1),
        ("100/seconds", 100, 1),
        ("10/minute", 10, 60),
        ("10/min", 10, 60),
        ("5/hour", 5, 3600),
        ("2/days", 2, 86400),
        ("10/5s", 10, 5),
        ("3/1.5h", 3, 5400),
        ("1/30 min", 1, 1800),
        ("10/.5s", 10, 0.5),
        (" 7 / S ", 7, 1),
        ("7/Minute", 7, 60),
    ],
)
def test_parse_rate(text: str, count: int, per: float) -> None:
    assert parse_rate(text) == Rate(count, per)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected '<count>/<period>'"),
        ("100", "expected"),
        ("100/", "expected"),
        ("/s", "expected"),
        ("ten/s", "expected"),
        ("1.5/s", "expected"),
        ("-1/s", "expected"),
        ("10/s/s", "expected"),
        ("10/5", "expected"),
        ("0/s", "count must be at least 1"),
        ("10/0s", "period must be positive"),
        ("10/xs", "unknown unit 'xs'"),
        ("10/ms", "unknown unit 'ms'"),
        ("10/week", "unknown unit 'week'"),
    ],
)
def test_parse_rate_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="bad rate") as info:
        parse_rate(text)
    assert message in str(info.value)


def test_parse_rate_needs_a_string() -> None:
    with pytest.raises(TypeError, match="string"):
        parse_rate(100)  # type: ignore[arg-type]


def test_rate_values() -> None:
    assert str(parse_rate("100/s")) == "100/s"
    assert str(parse_rate("10/minute")) == "10/m"
    assert str(parse_rate("10/5s")) == "10/5s"
    assert str(parse_rate("1/2h")) == "1/7200s"
    assert parse_rate("10/m").per_second == pytest.approx(1 / 6)
    for count, per in [(0, 1), (-1, 1), (1, 0), (1, 0.0001), (1, math.inf), (1, math.nan)]:
        with pytest.raises(ValueError, match="rate"):
            Rate(count, per)
    with pytest.raises(ValueError, match="count"):
        Rate(1.5, 1)  # type: ignore[arg-type]


def test_limit_and_task_limit() -> None:
    lim = limit("api", "10/s")
    assert lim == Limit("api", Rate(10, 1), burst=1)
    assert limit("api", Rate(10, 1), burst=5).burst == 5
    with pytest.raises(ValueError, match="burst"):
        limit("api", "10/s", burst=0)
    with pytest.raises(ValueError, match="limit key"):
        limit("", "10/s")
    with pytest.raises(ValueError, match="bad rate"):
        limit("api", "fast")
    assert task_limit("emails.send", "100/s") == Limit("task:emails.send", Rate(100, 1))
    assert task_limit("emails.send", lim) is lim
    assert limit_redis_key("bus", "api") == "bus:rate:api"
    assert running_redis_key("bus", "task:x") == "bus:running:task:x"
    assert bucket_args(limit("api", "10/5s", burst=3)) == ["", "10", "5000.0", "3"]
    assert bucket_args(limit("api", "1/s"), now_ms=123) == ["123", "1", "1000.0", "1"]


# --- the token bucket -----------------------------------------------------------------


def test_bucket_starts_full_and_refills() -> None:
    bucket = limit("k", "10/s", burst=3).bucket()
    assert [bucket.try_take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take(100.0) == pytest.approx(0.1)
    assert bucket.try_take(100.05) == pytest.approx(0.05)  # nothing was taken meanwhile
    assert bucket.try_take(100.1) == 0.0
    assert bucket.try_take(100.1) == pytest.approx(0.1)
    # A long idle spell refills up to the burst, not beyond.
    assert [bucket.try_take(200.0) for _ in range(4)][:3] == [0.0, 0.0, 0.0]


def test_default_burst_spreads_starts_evenly() -> None:
    bucket = TokenBucket(parse_rate("100/s"))
    assert bucket.try_take(0.0) == 0.0
    assert bucket.try_take(0.0) == pytest.approx(0.01)
    assert bucket.try_take(0.01) == 0.0


def test_a_clock_that_steps_back_refills_nothing() -> None:
    bucket = TokenBucket(parse_rate("1/s"))
    assert bucket.try_take(10.0) == 0.0
    assert bucket.try_take(5.0) == pytest.approx(1.0)
    assert bucket.try_take(10.5) == pytest.approx(0.5)
    assert bucket.try_take(11.0) == 0.0


rates = st.builds(Rate, st.integers(1, 200), st.sampled_from([1.0, 0.5, 2.0, 10.0, 60.0, 0.1, 3.7]))


def greedy_starts(bucket: TokenBucket, idles: list[float], per_round: int) -> list[float]:
    """A taker that, after each idle spell, starts `per_round` tasks as fast as allowed."""
    now = 1000.0
    starts: list[float] = []
    for idle in idles:
        now += idle
        for _ in range(per_round):
            while (wait := bucket.try_take(now)) > 0:
                now += wait
            starts.append(now)
    return starts


@settings(max_examples=200, deadline=None)
@given(
    rates,
    st.integers(1, 50),
    st.lists(st.floats(0, 5), min_size=1, max_size=20),
    st.integers(1, 60),
)
def test_starts_in_any_window_hold_at_most_rate_plus_burst(
    rate: Rate, burst: int, idles: list[float], per_round: int
) -> None:
    starts = greedy_starts(TokenBucket(rate, burst), idles, per_round)
    for window in (1.0, rate.per):
        bound = burst + rate.count * window / rate.per
        j = 0
        for i, first in enumerate(starts):
            j = max(j, i)
            while j + 1 < len(starts) and starts[j + 1] <= first + window:
                j += 1
            assert j - i + 1 <= bound + 1e-6, (window, first)


@settings(max_examples=100, deadline=None)
@given(rates, st.integers(1, 50))
def test_a_busy_bucket_runs_at_its_rate(rate: Rate, burst: int) -> None:
    n = burst + 3 * rate.count
    starts = greedy_starts(TokenBucket(rate, burst), [0.0], n)
    # The burst starts at once; the rest follow at the rate: 3 periods for 3 * count.
    assert starts[burst - 1] == starts[0]
    assert starts[-1] - starts[0] == pytest.approx(3 * rate.per, rel=1e-6)


# --- concurrency slots ----------------------------------------------------------------


def test_running_table_caps_live_leases() -> None:
    table = RunningTable()
    assert table.acquire("k", "a", 0, 10, max_running=2)
    assert table.acquire("k", "b", 0, 10, max_running=2)
    assert not table.acquire("k", "c", 1, 10, max_running=2)
    assert table.acquire("other", "c", 1, 10, max_running=2)  # keys are independent
    assert table.acquire("k", "a", 1, 10, max_running=2)  # a holder again: extended
    assert table.running("k", 1) == 2
    assert table.release("k", "b")
    assert not table.release("k", "b")
    assert table.acquire("k", "c", 2, 10, max_running=2)
    assert table.running("k", 2) == 2


def test_a_dead_workers_slot_comes_back_when_its_lease_expires() -> None:
    table = RunningTable()
    assert table.acquire("k", "dead", 0, 10, max_running=1)
    assert not table.acquire("k", "live", 9.9, 10, max_running=1)
    assert table.acquire("k", "live", 10, 10, max_running=1)  # expiry is exclusive
    assert not table.refresh("k", "dead", 11, 10)  # too late: the slot went elsewhere
    assert table.running("k", 11) == 1


def test_refresh_keeps_a_slot() -> None:
    table = RunningTable()
    assert table.acquire("k", "a", 0, 10, max_running=1)
    assert table.refresh("k", "a", 8, 10)
    assert not table.acquire("k", "b", 15, 10, max_running=1)
    assert table.running("k", 17.9) == 1
    assert table.running("k", 18) == 0
    assert not table.refresh("k", "nobody", 0, 10)


def test_running_table_validates() -> None:
    with pytest.raises(ValueError, match="max_running"):
        RunningTable().acquire("k", "a", 0, 10, max_running=0)
    with pytest.raises(ValueError, match="lease_ttl"):
        RunningTable().acquire("k", "a", 0, 0, max_running=1)


# --- the Redis scripts ----------------------------------------------------------------

# The client fixture is shared by the examples of a property test: each example starts
# by deleting its key.
SHARED_CLIENT = HealthCheck.function_scoped_fixture


@pytest.mark.redis
def test_lua_token_bucket(redis_client: redis.Redis, key_prefix: str) -> None:
    take = redis_client.register_script(TOKEN_BUCKET_LUA)
    key = limit_redis_key(key_prefix, "api")
    lim = limit("api", "10/s", burst=3)

    def at(ms: int) -> int:
        result: int = take(keys=[key], args=bucket_args(lim, now_ms=ms))
        return result

    assert [at(1000), at(1000), at(1000)] == [0, 0, 0]
    assert at(1000) == 100
    assert at(1050) == 50
    assert at(1100) == 0
    assert at(1100) == 100
    assert 0 < redis_client.pttl(key) <= 300  # gone when it would be full again
    assert [at(10_000) for _ in range(4)] == [0, 0, 0, 100]  # refilled to the burst only
    assert at(5000) == 100  # a clock that steps back refills nothing


@pytest.mark.redis
def test_lua_token_bucket_on_server_time(redis_client: redis.Redis, key_prefix: str) -> None:
    take = redis_client.register_script(TOKEN_BUCKET_LUA)
    key = limit_redis_key(key_prefix, "slow")
    args = bucket_args(limit("slow", "1/h", burst=2))
    assert take(keys=[key], args=args) == 0
    assert take(keys=[key], args=args) == 0
    assert 3_590_000 < take(keys=[key], args=args) <= 3_600_000


@pytest.mark.redis
@settings(max_examples=30, deadline=None, suppress_health_check=[SHARED_CLIENT])
@given(
    rates,
    st.integers(1, 10),
    st.lists(st.integers(0, 700), min_size=1, max_size=40),
)
def test_lua_token_bucket_decides_like_the_memory_one(
    redis_client: redis.Redis, key_prefix: str, rate: Rate, burst: int, gaps: list[int]
) -> None:
    take = redis_client.register_script(TOKEN_BUCKET_LUA)
    key = limit_redis_key(key_prefix, "compare")
    redis_client.delete(key)
    lim = Limit("compare", rate, burst)
    bucket = lim.bucket()
    now_ms = 1_000_000
    for gap in gaps:
        now_ms += gap
        waited: int = take(keys=[key], args=bucket_args(lim, now_ms=now_ms))
        expected = bucket.try_take(now_ms / 1000)
        assert (waited == 0) == (expected == 0)
        assert abs(waited - math.ceil(expected * 1000)) <= 1


@pytest.mark.redis
def test_lua_slots(redis_client: redis.Redis, key_prefix: str) -> None:
    acquire = redis_client.register_script(ACQUIRE_SLOT_LUA)
    refresh = redis_client.register_script(REFRESH_SLOT_LUA)
    release = redis_client.register_script(RELEASE_SLOT_LUA)
    key = running_redis_key(key_prefix, "task:x")

    def take(token: str, now: int, lease: int = 10_000, cap: int = 2) -> int:
        result: int = acquire(keys=[key], args=[now, token, cap, lease])
        return result

    assert take("a", 0) == 1
    assert take("b", 0) == 1
    assert take("c", 1000) == 0
    assert take("a", 1000) == 1  # a holder again: its lease is extended to 11_000
    assert redis_client.zscore(key, "a") == 11_000
    assert release(keys=[key], args=["b"]) == 1
    assert release(keys=[key], args=["b"]) == 0
    assert take("c", 2000) == 1
    # b's crash: c is never refreshed; at 12_000 its lease is over and its slot free.
    assert refresh(keys=[key], args=[9000, "a", 10_000]) == 1  # a now until 19_000
    assert take("d", 11_999) == 0
    assert take("d", 12_000) == 1
    assert refresh(keys=[key], args=[12_500, "c", 10_000]) == 0  # c lost its slot
    assert redis_client.zscore(key, "c") is None
    assert refresh(keys=[key], args=[12_500, "nobody", 10_000]) == 0
    # The set lives as long as its last lease (d: until 22_000, set at 12_000).
    assert 9000 < redis_client.pttl(key) <= 10_000


@pytest.mark.redis
def test_lua_slots_on_server_time(redis_client: redis.Redis, key_prefix: str) -> None:
    acquire = redis_client.register_script(ACQUIRE_SLOT_LUA)
    refresh = redis_client.register_script(REFRESH_SLOT_LUA)
    key = running_redis_key(key_prefix, "srv")
    assert acquire(keys=[key], args=["", "a", 1, 60_000]) == 1
    assert acquire(keys=[key], args=["", "b", 1, 60_000]) == 0
    assert refresh(keys=[key], args=["", "a", 60_000]) == 1
    assert 59_000 < redis_client.pttl(key) <= 60_000


ops = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "refresh", "release"]),
        st.sampled_from(["a", "b", "c", "d"]),
        st.integers(0, 3000),  # time step, ms
        st.sampled_from([1000, 2500, 5000]),  # lease, ms
    ),
    min_size=1,
    max_size=40,
)


@pytest.mark.redis
@settings(max_examples=30, deadline=None, suppress_health_check=[SHARED_CLIENT])
@given(st.integers(1, 3), ops)
def test_lua_slots_decide_like_the_memory_table(
    redis_client: redis.Redis,
    key_prefix: str,
    cap: int,
    steps: list[tuple[str, str, int, int]],
) -> None:
    acquire = redis_client.register_script(ACQUIRE_SLOT_LUA)
    refresh = redis_client.register_script(REFRESH_SLOT_LUA)
    release = redis_client.register_script(RELEASE_SLOT_LUA)
    key = running_redis_key(key_prefix, "compare")
    redis_client.delete(key)
    table = RunningTable()
    now = 1_000_000
    for op, token, step, lease in steps:
        now += step
        if op == "acquire":
            got = acquire(keys=[key], args=[now, token, cap, lease])
            want = table.acquire("k", token, now / 1000, lease / 1000, max_running=cap)
        elif op == "refresh":
            got = refresh(keys=[key], args=[now, token, lease])
            want = table.refresh("k", token, now / 1000, lease / 1000)
        else:
            got = release(keys=[key], args=[token])
            want = table.release("k", token)
        assert bool(got) == want, (op, token, now)
