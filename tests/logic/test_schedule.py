"""Schedules: ticks, daylight-saving time, the plan, tick ids and claims. No sleeping."""

from __future__ import annotations

import datetime as dt
import math
from itertools import islice, pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus._ids import TaskID
from bus._schedule import (
    MISSED_COUNT_LIMIT,
    Cron,
    Every,
    Plan,
    ScheduleSpec,
    Trigger,
    claim_key,
    claim_ttl,
    cron,
    every,
    plan,
    tick_task_id,
)

PARIS = ZoneInfo("Europe/Paris")
UTC = dt.UTC


def at(
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    second: int = 0,
    *,
    tz: dt.tzinfo = UTC,
    fold: int = 0,
) -> float:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=tz, fold=fold).timestamp()


def ticks(trigger: Trigger, start: float, n: int) -> list[float]:
    out = []
    t = start
    for _ in range(n):
        t = trigger.next_after(t)
        out.append(t)
    return out


def ticks_until(trigger: Trigger, start: float, end: float) -> list[float]:
    out = []
    t = trigger.next_after(start)
    while t <= end:
        out.append(t)
        t = trigger.next_after(t)
    return out


def local(t: float) -> str:
    return dt.datetime.fromtimestamp(t, PARIS).isoformat()


# --- construction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("* * * *", "needs 5 fields"),
        ("", "needs 5 fields"),
        ("0 * * * * *", "use bus.every()"),
        ("61 * * * *", "Bad minute"),
        ("0 25 * * *", "Bad hour"),
        ("0 0 30 2 *", "Bad day-of-month"),
        ("0 0 * * FOO", "Bad day-of-week"),
        ("@sometimes", "needs 5 fields"),
    ],
)
def test_bad_cron_expressions_raise_value_error(expr: str, message: str) -> None:
    with pytest.raises(ValueError, match="cron expression") as info:
        cron(expr)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "tz", ["Mars/Olympus_Mons", "../etc/passwd", "/usr/share/zoneinfo/UTC", ""]
)
def test_unknown_time_zone_raises_value_error(tz: str) -> None:
    with pytest.raises(ValueError, match="unknown time zone"):
        cron("0 * * * *", tz)


def test_cron_values() -> None:
    c = cron("30 2 * * *", "Europe/Paris")
    assert c == Cron("30 2 * * *", "Europe/Paris")
    assert hash(c) == hash(Cron("30 2 * * *", "Europe/Paris"))
    assert cron("30 2 * * *").tz is None
    assert repr(c) == "Cron(expr='30 2 * * *', tz='Europe/Paris')"
    with pytest.raises(TypeError):
        cron(5)  # type: ignore[arg-type]


@pytest.mark.parametrize("seconds", [0, -1, -0.5, 0.0001, math.inf, math.nan])
def test_every_needs_a_positive_period(seconds: float) -> None:
    with pytest.raises(ValueError, match="seconds"):
        every(seconds)


def test_every_rejects_non_numbers() -> None:
    with pytest.raises(TypeError):
        every("5")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        every(True)
    with pytest.raises(ValueError, match="anchor"):
        every(5, anchor=math.inf)


def test_nicknames() -> None:
    start = at(2027, 5, 5, 12, 34)
    assert cron("@hourly").next_after(start) == at(2027, 5, 5, 13)
    assert cron("@daily").next_after(start) == at(2027, 5, 6)
    assert cron("@midnight").next_after(start) == at(2027, 5, 6)
    assert cron("@weekly").next_after(start) == at(2027, 5, 9)  # a Sunday
    assert cron("@monthly").next_after(start) == at(2027, 6, 1)
    assert cron("@yearly").next_after(start) == at(2028, 1, 1)
    assert cron("@Annually").next_after(start) == at(2028, 1, 1)


# --- basic ticks ----------------------------------------------------------------------


def test_every_five_minutes() -> None:
    c = cron("*/5 * * * *")
    assert c.next_after(at(2027, 1, 1, 12, 3)) == at(2027, 1, 1, 12, 5)
    assert c.next_after(at(2027, 1, 1, 12, 5)) == at(2027, 1, 1, 12, 10)  # strictly after
    assert c.next_after(at(2027, 1, 1, 12, 5) - 0.001) == at(2027, 1, 1, 12, 5)
    assert c.next_after(at(2027, 1, 1, 12, 5) + 0.5) == at(2027, 1, 1, 12, 10)
    assert c.next_after(at(2027, 12, 31, 23, 58)) == at(2028, 1, 1)
    hour = ticks_until(c, at(2027, 1, 1, 12), at(2027, 1, 1, 13))
    assert hour == [at(2027, 1, 1, 12, m) for m in range(5, 60, 5)] + [at(2027, 1, 1, 13)]


def test_cron_in_a_zone_without_dst_is_shifted() -> None:
    c = cron("0 9 * * *", "Asia/Kolkata")  # UTC+05:30
    assert c.next_after(at(2027, 1, 1)) == at(2027, 1, 1, 3, 30)


def test_every_ticks_from_its_anchor() -> None:
    e = every(60)
    assert e.next_after(at(2027, 1, 1, 12, 0, 30)) == at(2027, 1, 1, 12, 1)
    assert e.next_after(at(2027, 1, 1, 12, 1)) == at(2027, 1, 1, 12, 2)
    shifted = every(10, anchor=3)
    assert ticks(shifted, 0, 3) == [3, 13, 23]
    assert ticks(shifted, -100, 2) == [-97, -87]
    assert ticks(every(0.25), 1000, 4) == [1000.25, 1000.5, 1000.75, 1001]


# --- daylight-saving time (Europe/Paris, 2027: 03-28 02:00->03:00, 10-31 03:00->02:00) --


def test_daily_0230_across_spring_forward_fires_once_after_the_gap() -> None:
    c = cron("30 2 * * *", "Europe/Paris")
    got = ticks(c, at(2027, 3, 26, 12, tz=PARIS), 3)
    assert got == [
        at(2027, 3, 27, 1, 30),  # 02:30 CET
        at(2027, 3, 28, 1, 0),  # 02:30 does not exist: 03:00 CEST, the first instant after
        at(2027, 3, 29, 0, 30),  # 02:30 CEST
    ]
    assert [local(t) for t in got] == [
        "2027-03-27T02:30:00+01:00",
        "2027-03-28T03:00:00+02:00",
        "2027-03-29T02:30:00+02:00",
    ]


def test_daily_0230_across_fall_back_fires_once_at_the_first_occurrence() -> None:
    c = cron("30 2 * * *", "Europe/Paris")
    got = ticks(c, at(2027, 10, 30, 12, tz=PARIS), 2)
    assert got == [at(2027, 10, 31, 0, 30), at(2027, 11, 1, 1, 30)]
    assert local(got[0]) == "2027-10-31T02:30:00+02:00"  # first occurrence (CEST)
    # Between the two occurrences, and during the second one: the next tick is tomorrow.
    second = at(2027, 10, 31, 2, 30, tz=PARIS, fold=1)
    assert second == at(2027, 10, 31, 1, 30)
    for t in (got[0], at(2027, 10, 31, 2, 10, tz=PARIS, fold=1), second - 1, second):
        assert c.next_after(t) == got[1]


def test_fixed_time_schedules_follow_the_wall_clock() -> None:
    c = cron("0 1-4 * * *", "Europe/Paris")
    spring = ticks_until(c, at(2027, 3, 28, tz=PARIS), at(2027, 3, 28, 12, tz=PARIS))
    assert [local(t) for t in spring] == [
        "2027-03-28T01:00:00+01:00",
        "2027-03-28T03:00:00+02:00",  # 02:00 (skipped) and 03:00 are one tick
        "2027-03-28T04:00:00+02:00",
    ]
    fall = ticks_until(c, at(2027, 10, 31, tz=PARIS), at(2027, 10, 31, 12, tz=PARIS))
    assert [local(t) for t in fall] == [
        "2027-10-31T01:00:00+02:00",
        "2027-10-31T02:00:00+02:00",  # once: the repeated 02:00 (CET) does not fire
        "2027-10-31T03:00:00+01:00",
        "2027-10-31T04:00:00+01:00",
    ]


def test_several_skipped_times_of_one_gap_fire_as_one_tick() -> None:
    c = cron("0,30 2 * * *", "Europe/Paris")
    got = ticks_until(c, at(2027, 3, 28, tz=PARIS), at(2027, 3, 29, 12, tz=PARIS))
    assert [local(t) for t in got] == [
        "2027-03-28T03:00:00+02:00",
        "2027-03-29T02:00:00+02:00",
        "2027-03-29T02:30:00+02:00",
    ]


@pytest.mark.parametrize(
    ("day", "hours"), [((2027, 3, 28), 23), ((2027, 10, 31), 25), ((2027, 6, 1), 24)]
)
def test_hourly_follows_elapsed_time(day: tuple[int, int, int], hours: int) -> None:
    c = cron("0 * * * *", "Europe/Paris")
    start = at(*day, tz=PARIS) - 1
    next_day = dt.datetime(*day, tzinfo=PARIS) + dt.timedelta(days=1)
    got = ticks_until(c, start, next_day.timestamp() - 1)
    assert len(got) == hours
    assert all(b - a == 3600 for a, b in pairwise(got))


def test_hourly_across_the_transitions_in_local_time() -> None:
    c = cron("0 * * * *", "Europe/Paris")
    spring = ticks(c, at(2027, 3, 28, 0, 30, tz=PARIS), 3)
    assert [local(t) for t in spring] == [
        "2027-03-28T01:00:00+01:00",
        "2027-03-28T03:00:00+02:00",
        "2027-03-28T04:00:00+02:00",
    ]
    fall = ticks(c, at(2027, 10, 31, 1, 30, tz=PARIS), 3)
    assert [local(t) for t in fall] == [
        "2027-10-31T02:00:00+02:00",
        "2027-10-31T02:00:00+01:00",  # a distinct real hour: it fires
        "2027-10-31T03:00:00+01:00",
    ]


def test_interval_schedule_confined_to_the_gap() -> None:
    c = cron("*/30 2 * * *", "Europe/Paris")
    spring = ticks_until(c, at(2027, 3, 28, tz=PARIS), at(2027, 3, 28, 23, tz=PARIS))
    assert spring == []
    fall = ticks_until(c, at(2027, 10, 31, tz=PARIS), at(2027, 10, 31, 23, tz=PARIS))
    assert [local(t) for t in fall] == [
        "2027-10-31T02:00:00+02:00",
        "2027-10-31T02:30:00+02:00",
        "2027-10-31T02:00:00+01:00",
        "2027-10-31T02:30:00+01:00",
    ]


def test_zone_with_a_30_minute_shift() -> None:
    # Australia/Lord_Howe: 2027-04-04 02:00 (+11) -> 01:30 (+10:30); 2027-10-03 02:00 -> 02:30.
    howe = ZoneInfo("Australia/Lord_Howe")
    start = at(2027, 4, 4, 1, 30, tz=howe, fold=1)
    assert cron("* 0 * * *", "Australia/Lord_Howe").next_after(start) == at(2027, 4, 5, tz=howe)
    fixed = cron("15 2 * * *", "Australia/Lord_Howe")
    spring = fixed.next_after(at(2027, 10, 3, tz=howe))
    assert dt.datetime.fromtimestamp(spring, howe).isoformat() == "2027-10-03T02:30:00+11:00"
    hourly = cron("0 * * * *", "Australia/Lord_Howe")
    got = ticks(hourly, at(2027, 10, 3, 0, 30, tz=howe), 3)
    assert [dt.datetime.fromtimestamp(t, howe).strftime("%H:%M%z") for t in got] == [
        "01:00+1030",
        "03:00+1100",  # the clock shows no 02:00 this night
        "04:00+1100",
    ]


def test_every_ignores_dst() -> None:
    e = every(3600)
    got = ticks_until(e, at(2027, 10, 30, 22), at(2027, 10, 31, 4))
    assert len(got) == 6
    assert all(b - a == 3600 for a, b in pairwise(got))


# --- properties -----------------------------------------------------------------------

ZONES = [
    None,
    "UTC",
    "Europe/Paris",
    "America/New_York",
    "America/Santiago",  # transitions at midnight
    "America/Havana",  # transitions at midnight (spring) and 01:00 (fall)
    "Australia/Lord_Howe",  # 30-minute shift
    "Pacific/Chatham",  # UTC+12:45 / +13:45
    "Asia/Kolkata",
]
EXPRESSIONS = [
    "* * * * *",
    "*/5 * * * *",
    "0 * * * *",
    "30 2 * * *",
    "0 0 * * *",
    "0,30 1-3 * * *",
    "*/30 2 * * *",
    "15 */2 * * 1-5",
    "0 0 1 * *",
    "0 0 29 2 *",
    "45 23 * * 0",
    "0 0 L * *",
]
times = st.floats(min_value=at(2019, 1, 1), max_value=at(2040, 1, 1))
crons = st.builds(Cron, st.sampled_from(EXPRESSIONS), st.sampled_from(ZONES))
everys = st.builds(
    Every,
    st.one_of(st.floats(min_value=0.001, max_value=1e6), st.integers(1, 10**6)),
    st.one_of(st.just(0.0), times),
)
triggers = st.one_of(crons, everys)


@settings(max_examples=300, deadline=None)
@given(triggers, times, st.floats(min_value=0, max_value=1, exclude_max=True))
def test_ticks_increase_and_are_found_again_from_just_before(
    trigger: Trigger, t: float, u: float
) -> None:
    tick = trigger.next_after(t)
    assert tick > t
    following = trigger.next_after(tick)
    assert following > tick
    # Any time from t up to (not including) the tick finds that same tick again.
    probe = t + u * (tick - t)
    if probe < tick:
        assert trigger.next_after(probe) == tick
    epsilon = min(0.001, (tick - t) / 2)
    if tick - epsilon < tick:  # (near 2**31 s, half the gap of two floats rounds back)
        assert trigger.next_after(tick - epsilon) == tick
    if isinstance(trigger, Cron):
        assert tick == int(tick)


@settings(max_examples=100, deadline=None)
@given(triggers, times)
def test_iterating_matches_chaining_next_after(trigger: Trigger, t: float) -> None:
    run = list(islice(trigger._ticks_after(t), 30))
    assert run == ticks(trigger, t, 30)
    assert run == sorted(set(run))


# --- plan -----------------------------------------------------------------------------

T = at(2027, 6, 1, 12)  # a tick of every(60), every(3600) and of hourly crons


def spec(trigger: Trigger, grace: float = 60.0) -> ScheduleSpec:
    return ScheduleSpec("sched", "task", trigger, misfire_grace=grace)


def test_normal_tick_fires() -> None:
    s = spec(every(60))
    assert plan(s, T - 60, T + 0.003) == Plan((T,), 0, T + 60, T)


def test_clock_exactly_on_a_tick_fires_it() -> None:
    s = spec(every(60))
    assert plan(s, T - 60, T) == Plan((T,), 0, T + 60, T)
    assert plan(s, None, T) == Plan((T,), 0, T + 60, T)
    c = spec(cron("0 * * * *"))
    assert plan(c, None, T) == Plan((T,), 0, T + 3600, T)


def test_new_schedule_has_no_backlog() -> None:
    s = spec(every(60))
    p = plan(s, None, T + 0.5)
    assert p == Plan((), 0, T + 60, T + 0.5)
    # The next call, at the next tick (a little late), fires it.
    assert plan(s, p.last_tick, T + 60.01) == Plan((T + 60,), 0, T + 120, T + 60)


def test_nothing_due_yet() -> None:
    s = spec(every(60))
    assert plan(s, T, T + 30) == Plan((), 0, T + 60, T)
    # Asking again right after firing fires nothing twice.
    p = plan(s, T - 60, T + 1)
    assert plan(s, p.last_tick, T + 1) == Plan((), 0, T + 60, T)


def test_late_within_grace_fires_once() -> None:
    s = spec(every(3600), grace=60)
    assert plan(s, T - 3600, T + 45) == Plan((T,), 0, T + 3600, T)


def test_late_beyond_grace_is_skipped_and_counted() -> None:
    s = spec(every(3600), grace=60)
    assert plan(s, T - 3600, T + 61) == Plan((), 1, T + 3600, T)


def test_many_missed_ticks_fire_at_most_one() -> None:
    s = spec(every(60), grace=60)
    # Down for ten minutes: ten ticks due (T-540 ... T); the latest fires, nine are missed.
    assert plan(s, T - 600, T + 10) == Plan((T,), 9, T + 60, T)
    hourly = spec(every(3600), grace=60)
    assert plan(hourly, T - 5 * 3600, T + 100) == Plan((), 5, T + 3600, T)
    c = spec(cron("0 * * * *"))
    assert plan(c, T - 5 * 3600, T + 10) == Plan((T,), 4, T + 3600, T)


def test_huge_cron_backlog_is_capped() -> None:
    c = spec(cron("* * * * *"))
    p = plan(c, T - 365 * 86400, T + 1)
    assert p == Plan((T,), MISSED_COUNT_LIMIT, T + 60, T)
    e = spec(every(60))
    assert plan(e, T - 365 * 86400, T + 1) == Plan((T,), 365 * 1440 - 1, T + 60, T)


def test_clock_that_went_back_fires_nothing_already_handled() -> None:
    s = spec(every(60))
    assert plan(s, T + 120, T) == Plan((), 0, T + 180, T + 120)


def test_plan_across_fall_back_fires_the_repeated_time_once() -> None:
    s = spec(cron("30 2 * * *", "Europe/Paris"))
    first = at(2027, 10, 31, 0, 30)
    p = plan(s, first - 86400, first + 1)
    assert p.fire == (first,)
    # The scheduler wakes again at 02:30 CET (the second occurrence): nothing is due.
    q = plan(s, p.last_tick, at(2027, 10, 31, 1, 30))
    assert q == Plan((), 0, at(2027, 11, 1, 1, 30), first)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([every(60), every(7.5, anchor=3), cron("*/5 * * * *"), cron("0 * * * *")]),
    st.floats(min_value=1, max_value=600),
    st.lists(st.floats(min_value=0.001, max_value=4000), min_size=1, max_size=30),
)
def test_a_scheduler_handles_every_tick_exactly_once(
    trigger: Trigger, grace: float, sleeps: list[float]
) -> None:
    s = spec(trigger, grace)
    last: float | None = T
    now = T
    fired: list[float] = []
    missed = 0
    for sleep in sleeps:
        now += sleep
        p = plan(s, last, now)
        assert len(p.fire) <= 1
        assert p.next_tick > now
        fired.extend(p.fire)
        missed += p.missed
        for tick in p.fire:
            assert now - grace <= tick <= now
        last = p.last_tick
    assert fired == sorted(set(fired))
    assert len(fired) + missed == len(ticks_until(trigger, T, now))


# --- tick ids and claims --------------------------------------------------------------


def test_tick_task_id_is_a_deterministic_uuid7() -> None:
    tid = tick_task_id("nightly", T)
    assert isinstance(tid, TaskID)
    assert TaskID.parse(str(tid)) == tid
    assert tid.timestamp == T
    assert tick_task_id("nightly", T) == tid
    assert tick_task_id("nightly", T + 60) != tid
    assert tick_task_id("nightly2", T) != tid
    assert tick_task_id("nightly", T + 0.0004) == tid  # ticks are told apart by the ms
    assert tick_task_id("nightly", T + 0.001) != tid


@settings(max_examples=200, deadline=None)
@given(
    st.text(st.characters(min_codepoint=32, exclude_categories=["Cs"]), min_size=1).filter(
        lambda s: s.strip() and len(s) <= 200 and "\x7f" not in s
    ),
    st.floats(min_value=0, max_value=2**47 / 1000),
)
def test_tick_task_ids_always_parse(name: str, tick: float) -> None:
    tid = tick_task_id(name, tick)
    assert TaskID.parse(str(tid)) == tid
    assert tid.timestamp == round(tick * 1000) / 1000


def test_tick_task_id_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="tick"):
        tick_task_id("x", -1)
    with pytest.raises(ValueError, match="tick"):
        tick_task_id("x", 2**48)
    with pytest.raises(ValueError, match="empty"):
        tick_task_id("", T)


def test_claim_key_and_ttl() -> None:
    assert claim_key("bus", "nightly", T) == f"bus:sched:nightly:{int(T * 1000)}"
    assert claim_key("bus", "nightly", 1.5) == "bus:sched:nightly:1500"
    assert claim_ttl(spec(every(60), grace=60), T) == 120
    assert claim_ttl(spec(every(1), grace=60), T) == 60
    assert claim_ttl(spec(cron("30 2 * * *"), grace=60), at(2027, 6, 1, 2, 30)) == 2 * 86400


# --- ScheduleSpec ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "trigger", [cron("30 2 * * *", "Europe/Paris"), cron("@hourly"), every(7.5, anchor=2)]
)
def test_spec_json_round_trip(trigger: Trigger) -> None:
    s = ScheduleSpec(
        "report",
        "reports.build",
        trigger,
        args=(1, "x", [2, 3]),
        kwargs={"day": "mon", "n": None},
        labels={"retries": 3, "tag": "é"},
        misfire_grace=5,
    )
    text = s.to_json()
    assert ScheduleSpec.from_json(text) == s
    assert ScheduleSpec.from_json(text.encode()) == s


def test_spec_trigger_encoding() -> None:
    c = ScheduleSpec("a", "t", cron("0 * * * *", "UTC")).to_json()
    assert '"trigger":{"cron":"0 * * * *","tz":"UTC"}' in c
    e = ScheduleSpec("a", "t", every(5)).to_json()
    assert '"trigger":{"every":5,"anchor":0.0}' in e


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "JSON text"),
        ("[]", "JSON object"),
        ('{"v": 2}', "version"),
        ('{"v": 1, "name": "a"}', "lacks"),
        (
            '{"v":1,"name":"a","task_name":"t","trigger":{"cron":"bad"},"args":[],'
            '"kwargs":{},"labels":{}}',
            "a trigger is",
        ),
        (
            '{"v":1,"name":"a","task_name":"t","trigger":{"cron":"* *","tz":null},'
            '"args":[],"kwargs":{},"labels":{}}',
            "bad cron expression",
        ),
        (
            '{"v":1,"name":"a","task_name":"t","trigger":{"every":0,"anchor":0},'
            '"args":[],"kwargs":{},"labels":{}}',
            "positive",
        ),
        (
            '{"v":1,"name":"a","task_name":"t","trigger":{"every":1,"anchor":0},'
            '"args":{},"kwargs":{},"labels":{}}',
            "args must be a list",
        ),
        (
            '{"v":1,"name":"a","task_name":"t","trigger":{"every":1,"anchor":0},'
            '"args":[],"kwargs":[],"labels":{}}',
            "kwargs must be a dict",
        ),
        (
            '{"v":1,"name":5,"task_name":"t","trigger":{"every":1,"anchor":0},'
            '"args":[],"kwargs":{},"labels":{}}',
            "schedule name must be a string",
        ),
    ],
)
def test_spec_from_bad_json(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScheduleSpec.from_json(text)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="empty"):
        ScheduleSpec("", "t", every(1))
    with pytest.raises(ValueError, match="control"):
        ScheduleSpec("a\nb", "t", every(1))
    with pytest.raises(TypeError, match="trigger"):
        ScheduleSpec("a", "t", "0 * * * *")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="misfire_grace"):
        ScheduleSpec("a", "t", every(1), misfire_grace=0)
    with pytest.raises(TypeError, match="labels"):
        ScheduleSpec("a", "t", every(1), labels={1: 2})  # type: ignore[dict-item]
    assert ScheduleSpec("a", "t", every(1), args=[1, 2]).args == (1, 2)
