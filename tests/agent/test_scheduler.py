"""SleepScheduler decisions, driven by a hand-set clock (time is an input here)."""

from __future__ import annotations

import datetime
import re
import time
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import ConfigError
from agent.scheduler import (
    SchedulerDecision,
    SleepScheduler,
    _Ring,
    parse_window,
    window_contains,
)

NOON = 12 * 60


def schedule(**overrides):
    base = dict(enabled=True, idle_after_s=60.0, idle_rate_hz=0.0, windows=(),
                max_duration_s=0.0, budget_s=30.0, min_interval_s=0.0, min_new_episodes=1)
    return SimpleNamespace(**{**base, **overrides})


class Clock:
    def __init__(self):
        self.t = 0.0          # monotonic seconds
        self.minute = NOON    # wall clock, minutes since midnight

    def make(self, **overrides) -> SleepScheduler:
        return SleepScheduler(schedule(**overrides), monotonic=lambda: self.t,
                              wallclock=lambda: self.minute)


def run(sch: SleepScheduler, clock: Clock, steps) -> None:
    """Steps: ("t", s) set the clock, ("wall", "HH:MM"), ("frames", n), ("every", dt, t_end)
    one frame every dt seconds up to t_end, ("request",), ("slept", t0, t1)."""
    for step in steps:
        kind, *args = step
        if kind == "t":
            clock.t = args[0]
        elif kind == "wall":
            h, m = args[0].split(":")
            clock.minute = int(h) * 60 + int(m)
        elif kind == "frames":
            sch.on_frames(args[0])
        elif kind == "every":
            dt, end = args
            while clock.t + dt <= end:
                clock.t += dt
                sch.on_frames(1)
        elif kind == "request":
            sch.request()
        elif kind == "slept":
            sch.sleep_started("idle", args[0])
            sch.sleep_ended(args[1])
        else:
            raise AssertionError(f"unknown step {step}")


START_CASES = [
    # id, schedule overrides, steps, new_episodes, expected (action, reason)
    ("idle after quiet", {}, [("frames", 5), ("t", 61)], 3, ("start", "idle")),
    ("not quiet long enough", {}, [("frames", 5), ("t", 59)], 3, ("none", "busy")),
    ("quiet since boot", {}, [("t", 60)], 3, ("start", "idle")),
    ("idle starts off", {"idle_after_s": 0}, [("t", 1e6)], 3, ("none", "busy")),
    ("rate under threshold", {"idle_rate_hz": 0.5},
     [("every", 4.0, 120)], 3, ("start", "idle")),
    ("rate over threshold", {"idle_rate_hz": 0.5},
     [("every", 1.0, 120)], 3, ("none", "busy")),
    ("rate needs a full span of history", {"idle_rate_hz": 0.5},
     [("t", 30), ("frames", 1)], 3, ("none", "busy")),
    ("too few episodes", {"min_new_episodes": 4}, [("t", 61)], 3, ("none", "min_new_episodes")),
    ("enough episodes", {"min_new_episodes": 3}, [("t", 61)], 3, ("start", "idle")),
    ("min interval not over", {"min_interval_s": 100},
     [("slept", 0, 10), ("t", 109)], 3, ("none", "min_interval")),
    ("min interval over", {"min_interval_s": 100},
     [("slept", 0, 10), ("t", 110)], 3, ("start", "idle")),
    ("command beats busy, episodes and interval", {"min_interval_s": 100, "min_new_episodes": 9},
     [("slept", 0, 10), ("t", 11), ("frames", 1), ("request",)], 0, ("start", "command")),
    ("disabled", {"enabled": False}, [("t", 61), ("request",)], 3, ("none", "disabled")),
    ("inside a window while busy", {"windows": ("02:00-04:00",)},
     [("wall", "02:00"), ("frames", 1)], 3, ("start", "window")),
    ("window end is exclusive", {"windows": ("02:00-04:00",)},
     [("wall", "04:00"), ("frames", 1)], 3, ("none", "busy")),
    ("window before midnight", {"windows": ("22:00-02:00",)},
     [("wall", "23:30"), ("frames", 1)], 3, ("start", "window")),
    ("window after midnight", {"windows": ("22:00-02:00",)},
     [("wall", "01:59"), ("frames", 1)], 3, ("start", "window")),
    ("outside a wrapping window", {"windows": ("22:00-02:00",)},
     [("wall", "02:00"), ("frames", 1)], 3, ("none", "busy")),
    ("second window", {"windows": ("01:00-02:00", "13:00-13:30")},
     [("wall", "13:10"), ("frames", 1)], 3, ("start", "window")),
    ("window still needs episodes", {"windows": ("02:00-04:00",), "min_new_episodes": 5},
     [("wall", "03:00")], 3, ("none", "min_new_episodes")),
    ("window wins over idle", {"windows": ("11:00-13:00",)}, [("t", 100)], 3,
     ("start", "window")),
]


@pytest.mark.parametrize("overrides, steps, new_episodes, want",
                         [c[1:] for c in START_CASES], ids=[c[0] for c in START_CASES])
def test_start_decisions(overrides, steps, new_episodes, want):
    clock = Clock()
    sch = clock.make(**overrides)
    run(sch, clock, steps)
    assert sch.poll(sleeping=False, new_episodes=new_episodes) == SchedulerDecision(*want)


STOP_CASES = [
    # id, schedule overrides, sleep reason, steps after the sleep began at t=100, expected
    ("idle sleep, quiet", {}, "idle", [("t", 200)], ("none", "sleeping")),
    ("idle sleep, one frame returns", {}, "idle", [("t", 101), ("frames", 1)],
     ("stop", "frames")),
    ("idle sleep, trickle under the rate", {"idle_rate_hz": 1.0}, "idle",
     [("every", 2.0, 130)], ("none", "sleeping")),
    ("idle sleep, data back over the rate", {"idle_rate_hz": 1.0}, "idle",
     [("t", 300), ("every", 0.1, 301)], ("stop", "frames")),
    ("window sleep keeps going with data", {"windows": ("11:00-13:00",)}, "window",
     [("every", 0.1, 110)], ("none", "sleeping")),
    ("window sleep ends with the window", {"windows": ("11:00-13:00",)}, "window",
     [("wall", "13:00")], ("stop", "window_end")),
    ("command sleep keeps going with data", {}, "command",
     [("every", 0.1, 110)], ("none", "sleeping")),
    ("max duration", {"max_duration_s": 50}, "command", [("t", 150)], ("stop", "max_duration")),
    ("max duration beats the window", {"max_duration_s": 50, "windows": ("11:00-13:00",)},
     "window", [("t", 150), ("wall", "14:00")], ("stop", "max_duration")),
    ("before max duration", {"max_duration_s": 50}, "idle", [("t", 149)], ("none", "sleeping")),
]


@pytest.mark.parametrize("overrides, reason, steps, want",
                         [c[1:] for c in STOP_CASES], ids=[c[0] for c in STOP_CASES])
def test_stop_decisions(overrides, reason, steps, want):
    clock = Clock()
    sch = clock.make(**overrides)
    run(sch, clock, [("frames", 3), ("t", 100)])
    sch.sleep_started(reason)
    run(sch, clock, steps)
    assert sch.poll(sleeping=True, new_episodes=0) == SchedulerDecision(*want)


def test_stop_is_sent_once_then_the_interval_counts_from_the_end():
    clock = Clock()
    sch = clock.make(min_interval_s=30)
    clock.t = 61
    assert sch.poll(sleeping=False, new_episodes=1).action == "start"
    sch.sleep_started("idle")
    clock.t = 70
    sch.on_frames(1)
    assert sch.poll(sleeping=True, new_episodes=0) == SchedulerDecision("stop", "frames")
    assert sch.poll(sleeping=True, new_episodes=0) == SchedulerDecision("none", "stopping")
    sch.sleep_ended()
    clock.t = 140     # quiet for 70 s >= 60, and 70 s since the end >= 30
    assert sch.poll(sleeping=False, new_episodes=1) == SchedulerDecision("start", "idle")
    st_ = sch.stats()
    assert (st_["sleeps"], st_["slept_s"], st_["stops"], st_["starts"]) == (
        1, 9.0, {"frames": 1}, {"idle": 1})


def test_request_while_sleeping_is_dropped():
    clock = Clock()
    sch = clock.make()
    sch.sleep_started("command")
    sch.request()
    assert sch.poll(sleeping=True, new_episodes=0).action == "none"
    sch.sleep_ended()
    sch.on_frames(1)
    assert sch.poll(sleeping=False, new_episodes=5) == SchedulerDecision("none", "busy")
    assert sch.stats()["requests_dropped"] == 1


def test_request_while_disabled_is_dropped():
    clock = Clock()
    sch = clock.make(enabled=False)
    sch.request()
    assert sch.poll(sleeping=False, new_episodes=5).reason == "disabled"
    sch.schedule.enabled = True
    sch.on_frames(1)
    assert sch.poll(sleeping=False, new_episodes=5) == SchedulerDecision("none", "busy")


def test_unreported_sleeps_are_adopted_and_closed():
    clock = Clock()
    sch = clock.make()
    clock.t = 61
    assert sch.poll(sleeping=False, new_episodes=1) == SchedulerDecision("start", "idle")
    clock.t = 62     # the daemon started it without sleep_started: adopted as "idle"
    assert sch.poll(sleeping=True, new_episodes=0).reason == "sleeping"
    assert sch.stats()["sleep_reason"] == "idle"
    sch.on_frames(1)
    assert sch.poll(sleeping=True, new_episodes=0) == SchedulerDecision("stop", "frames")
    clock.t = 65     # ended without sleep_ended
    sch.poll(sleeping=False, new_episodes=0)
    st_ = sch.stats()
    assert (st_["sleeping"], st_["sleeps"], st_["slept_s"]) == (False, 1, 3.0)
    sch2 = clock.make()
    sch2.poll(sleeping=True, new_episodes=0)
    assert sch2.stats()["sleep_reason"] == "external"


def test_wallclock_may_be_a_datetime_or_struct_time():
    for wall in (lambda: datetime.datetime(2024, 5, 1, 2, 30),
                 lambda: time.struct_time((2024, 5, 1, 2, 30, 0, 2, 122, 0))):
        sch = SleepScheduler(schedule(windows=("02:00-04:00",)), monotonic=lambda: 0.0,
                             wallclock=wall)
        assert sch.in_window()


@pytest.mark.parametrize("spec, want", [
    ("02:00-04:00", (120, 240)), ("22:00-02:00", (1320, 120)), ("7:05-7:06", (425, 426)),
    ("00:00-24:00", (0, 1440)), (" 23:59 - 00:00 ", (1439, 0)),
])
def test_parse_window(spec, want):
    assert parse_window(spec) == want


@pytest.mark.parametrize("spec", [
    "02:00", "2-4", "02:00-04:00-06:00", "24:00-01:00", "01:60-02:00", "01:00-24:01",
    "03:00-03:00", "ab:cd-ef:gh", "", "02:00–04:00",
])
def test_bad_windows_are_named(spec):
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        parse_window(spec)


@given(st.text(max_size=15))
def test_parse_window_raises_only_value_error(spec):
    try:
        start, end = parse_window(spec)
    except ValueError:
        return
    assert 0 <= start < 1440 and 0 <= end <= 1440 and start != end


@given(start=st.integers(0, 1439), end=st.integers(0, 1439), minute=st.floats(0, 1439.99))
def test_window_round_trip_and_wrap_is_the_complement(start, end, minute):
    if start == end:
        return
    spec = f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"
    assert parse_window(spec) == (start, end)
    assert window_contains((start, end), minute) != window_contains((end, start), minute)


def test_bad_schedule_is_named():
    with pytest.raises(ConfigError, match=r"sleep.windows\[1\]: sleep window 'late'"):
        SleepScheduler(schedule(windows=("01:00-02:00", "late")))
    with pytest.raises(ConfigError, match="lacks min_new_episodes"):
        SleepScheduler(SimpleNamespace(enabled=True, idle_after_s=1, idle_rate_hz=0,
                                       windows=(), max_duration_s=0, min_interval_s=0))
    with pytest.raises(ConfigError, match="sleep.idle_rate_hz=-1"):
        SleepScheduler(schedule(idle_rate_hz=-1))


@given(span=st.floats(1, 500), steps=st.lists(
    st.tuples(st.floats(0, 30), st.integers(1, 5)), max_size=60),
    query_span=st.floats(0, 500))
def test_ring_count_brackets_the_exact_count(span, steps, query_span):
    """Bucketed count vs brute force: it covers at least the last ``q`` seconds and at most
    one bucket more (``q`` capped at the ring's span)."""
    ring = _Ring(span, 32)
    t, events = 0.0, []
    for dt, k in steps:
        t += dt
        ring.add(k, t)
        events.append((t, k))
    q = min(query_span, span)
    got = ring.count(t, q)
    assert sum(k for te, k in events if te >= t - q) <= got
    assert got <= sum(k for te, k in events if te > t - q - 2 * ring.width_s)
