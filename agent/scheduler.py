"""When to sleep (consolidate) and when to stop: pure decision logic, no threads.

The daemon feeds activity in (``on_frames`` from the ingest thread, per batch), asks
``poll`` now and then (about once a second) and acts on the decision, reporting back with
``sleep_started`` / ``sleep_ended``. Both clocks are injected, so tests drive time by hand:
``monotonic`` (seconds) measures intervals, ``wallclock`` (minutes since midnight, or
anything with ``hour``/``minute`` or ``tm_hour``/``tm_min``) only places scheduled windows.

Starting (when not sleeping; nothing starts while ``schedule.enabled`` is false, and
requests made meanwhile are dropped):

* ``command``: a ``request()`` starts at the next poll, whatever the activity, episode
  count or interval (an operator asked). A request while sleeping is dropped.
* ``window``: inside a scheduled window (``"HH:MM-HH:MM"``, may wrap midnight; this
  reason wins when idle too), or
* ``idle``: no frames for ``idle_after_s`` seconds, or (when ``idle_rate_hz > 0``) at most
  ``idle_rate_hz`` frames/s over the last ``idle_after_s`` seconds; ``idle_after_s <= 0``
  turns idle starts off. Both need ``new_episodes >= min_new_episodes`` and
  ``min_interval_s`` since the last sleep ended.

Stopping (when sleeping), first match wins:

* ``max_duration``: ``max_duration_s`` elapsed (``<= 0``: no limit);
* ``window_end``: a window sleep and the clock left every window;
* ``frames``: an idle sleep and data came back -- any frame since the sleep began, or
  with ``idle_rate_hz > 0`` more than ``idle_rate_hz`` frames/s over the last
  ``preempt_window_s`` (shorter while the sleep is younger) -- so returning data preempts
  it within a poll or a few seconds. Window and command sleeps are not preempted by
  frames: a window reserves that time on purpose (an always-streaming device could never
  sleep otherwise) and a command is explicit; predictions keep running during a sleep
  anyway, the sleep only costs CPU.

``stop`` is returned once per sleep; later polls say ``none``/``stopping`` until
``sleep_ended``. The daemon should report with ``sleep_started(reason)``; a sleep it did
not report (``sleeping=True``) is adopted at that poll, with the reason of the last
``start`` decision (else ``external``), and one that ended unreported
(``sleeping=False``) is closed at that poll. ``schedule.budget_s`` is not used here: it
bounds the sleep's own work, not when it runs.

Rates come from a ring of count buckets (``_Ring``): ``on_frames`` is O(1), ``poll``
sums at most ~33 buckets. ``on_frames`` has one writer (the ingest thread) and the
readers tolerate a count one batch stale, so there is no lock.

>>> from types import SimpleNamespace
>>> schedule = SimpleNamespace(enabled=True, idle_after_s=60, idle_rate_hz=0, windows=(),
...                            max_duration_s=0, min_interval_s=0, min_new_episodes=1)
>>> t = [0.0]
>>> sch = SleepScheduler(schedule, monotonic=lambda: t[0], wallclock=lambda: 720)
>>> sch.poll(sleeping=False, new_episodes=3).action
'none'
>>> t[0] = 61.0
>>> sch.poll(sleeping=False, new_episodes=3)
SchedulerDecision(action='start', reason='idle')
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigError

_WINDOW_RE = re.compile(r"^\s*([0-9]{1,2}):([0-9]{2})\s*-\s*([0-9]{1,2}):([0-9]{2})\s*$")
_FIELDS = ("enabled", "idle_after_s", "idle_rate_hz", "windows", "max_duration_s",
           "min_interval_s", "min_new_episodes")


def parse_window(spec: str) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` -> (start, end) in minutes since midnight; end may be before start
    (wraps midnight) and may be ``24:00``.

    >>> parse_window("02:00-04:00"), parse_window("22:00-02:00"), parse_window("20:00-24:00")
    ((120, 240), (1320, 120), (1200, 1440))
    """
    m = _WINDOW_RE.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"sleep window {spec!r}: expected 'HH:MM-HH:MM', e.g. '02:00-04:00'")
    h0, m0, h1, m1 = (int(g) for g in m.groups())
    if h0 > 23 or m0 > 59 or m1 > 59 or h1 > 24 or (h1 == 24 and m1):
        raise ValueError(f"sleep window {spec!r}: hours 00-23 (end may be 24:00), minutes 00-59")
    start, end = h0 * 60 + m0, h1 * 60 + m1
    if start == end:
        raise ValueError(f"sleep window {spec!r}: start equals end (empty or whole day?)")
    return start, end


def window_contains(window: tuple[int, int], minute: float) -> bool:
    """Whether ``minute`` (since midnight) falls in ``[start, end)``, wrapping midnight."""
    start, end = window
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


def _minutes(value: Any) -> float:
    """Minutes since midnight from a number, a datetime/time or a struct_time."""
    if isinstance(value, int | float):
        return float(value) % 1440
    if hasattr(value, "tm_hour"):
        return value.tm_hour * 60 + value.tm_min + value.tm_sec / 60
    if hasattr(value, "hour"):
        return value.hour * 60 + value.minute + value.second / 60
    raise TypeError(f"wallclock returned {value!r}: expected minutes since midnight, a "
                    "datetime or a struct_time")


class _Ring:
    """Frame counts in ``n`` buckets of ``width_s`` seconds: O(1) add, O(n) count."""

    def __init__(self, span_s: float, n: int):
        self.width_s = max(1.0, span_s / n)
        self.n = math.ceil(span_s / self.width_s) + 1   # +1: the current, partial bucket
        self._ids = [-1] * self.n
        self._counts = [0] * self.n

    def add(self, k: int, t: float) -> None:
        b = int(t // self.width_s)
        i = b % self.n
        if self._ids[i] != b:
            self._ids[i] = b
            self._counts[i] = 0
        self._counts[i] += k

    def count(self, t: float, span_s: float) -> int:
        """Frames in the buckets overlapping the last ``span_s`` seconds."""
        now_b = int(t // self.width_s)
        oldest = now_b - min(self.n - 1, math.ceil(span_s / self.width_s))
        return sum(c for b, c in zip(self._ids, self._counts, strict=True) if oldest <= b <= now_b)


@dataclass(frozen=True)
class SchedulerDecision:
    action: str   # "none" | "start" | "stop"
    reason: str   # start: command|window|idle; stop: max_duration|window_end|frames; none: why


class SleepScheduler:
    """Decides when to start and stop sleeps (rules in the module docstring).

    ``schedule`` is any object with the fields of ``agent.config.SleepSchedule``.
    """

    def __init__(self, schedule: Any, *, monotonic: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], Any] = time.localtime, preempt_window_s: float = 5.0):
        missing = [f for f in _FIELDS if not hasattr(schedule, f)]
        if missing:
            raise ConfigError(f"sleep schedule {schedule!r} lacks {', '.join(missing)}")
        for f in ("idle_rate_hz", "min_interval_s", "min_new_episodes"):
            if getattr(schedule, f) < 0:
                raise ConfigError(f"sleep.{f}={getattr(schedule, f)!r}: expected >= 0")
        if preempt_window_s <= 0:
            raise ValueError(f"preempt_window_s={preempt_window_s}: expected > 0")
        windows = []
        for i, spec in enumerate(schedule.windows):
            try:
                windows.append(parse_window(spec))
            except ValueError as exc:
                raise ConfigError(f"sleep.windows[{i}]: {exc}") from None
        self.schedule = schedule
        self.windows = tuple(windows)
        self.preempt_window_s = preempt_window_s
        self._monotonic = monotonic
        self._wallclock = wallclock
        self._created_t = monotonic()
        self._idle_ring = _Ring(max(schedule.idle_after_s, 1.0), 32)
        self._recent_ring = _Ring(preempt_window_s, max(1, math.ceil(preempt_window_s)))
        self._frames = 0
        self._last_frame_t: float | None = None
        self._requested: str | None = None
        self._pending: str | None = None         # reason of the last start decision
        self._sleep_reason: str | None = None    # set while sleeping
        self._sleep_t = 0.0
        self._sleep_frames0 = 0                  # self._frames when the sleep began
        self._stop_sent = False
        self._last_end_t: float | None = None
        self._sleeps = 0
        self._slept_s = 0.0
        self._starts: dict[str, int] = {}
        self._stops: dict[str, int] = {}
        self._requests_dropped = 0

    # -- inputs ----------------------------------------------------------------------
    def on_frames(self, n: int = 1, now: float | None = None) -> None:
        """Count ``n`` frames of activity (hot path: O(1))."""
        t = self._monotonic() if now is None else now
        self._frames += n
        self._last_frame_t = t
        self._idle_ring.add(n, t)
        self._recent_ring.add(n, t)

    def request(self, reason: str = "command") -> None:
        """Ask for a sleep at the next poll, regardless of activity (dropped if sleeping)."""
        self._requested = reason

    def sleep_started(self, reason: str, now: float | None = None) -> None:
        self._sleep_reason = reason
        self._sleep_t = self._monotonic() if now is None else now
        self._sleep_frames0 = self._frames
        self._stop_sent = False
        self._pending = None
        self._starts[reason] = self._starts.get(reason, 0) + 1

    def sleep_ended(self, now: float | None = None) -> None:
        if self._sleep_reason is None:
            return
        t = self._monotonic() if now is None else now
        self._sleeps += 1
        self._slept_s += max(0.0, t - self._sleep_t)
        self._last_end_t = t
        self._sleep_reason = None

    # -- decisions -------------------------------------------------------------------
    def in_window(self) -> bool:
        """Whether the wall clock is inside a scheduled window."""
        if not self.windows:
            return False
        minute = _minutes(self._wallclock())
        return any(window_contains(w, minute) for w in self.windows)

    def is_idle(self, now: float | None = None) -> bool:
        """The idle rule of the module docstring, at ``now``."""
        t = self._monotonic() if now is None else now
        after = self.schedule.idle_after_s
        if after <= 0:
            return False
        since = self._last_frame_t if self._last_frame_t is not None else self._created_t
        if t - since >= after:
            return True
        rate_hz = self.schedule.idle_rate_hz
        return (rate_hz > 0 and t - self._created_t >= after
                and self._idle_ring.count(t, after) / after <= rate_hz)

    def poll(self, *, sleeping: bool, new_episodes: int,
             now: float | None = None) -> SchedulerDecision:
        """What to do now; ``sleeping`` is whether a sleep is running, ``new_episodes`` how
        many episodes were stored since the last sleep."""
        t = self._monotonic() if now is None else now
        if sleeping:
            if self._requested is not None:
                self._requested = None
                self._requests_dropped += 1
            if self._sleep_reason is None:
                self.sleep_started(self._pending or "external", t)
            if self._stop_sent:
                return SchedulerDecision("none", "stopping")
            reason = self._stop_reason(t)
            if reason is None:
                return SchedulerDecision("none", "sleeping")
            self._stop_sent = True
            self._stops[reason] = self._stops.get(reason, 0) + 1
            return SchedulerDecision("stop", reason)

        if self._sleep_reason is not None:    # it ended without sleep_ended
            self.sleep_ended(t)
        s = self.schedule
        if not s.enabled:
            self._requested = None
            return SchedulerDecision("none", "disabled")
        if self._requested is not None:
            reason, self._requested = self._requested, None
            return self._start(reason)
        window = self.in_window()
        if not window and not self.is_idle(t):
            return SchedulerDecision("none", "busy")
        if new_episodes < s.min_new_episodes:
            return SchedulerDecision("none", "min_new_episodes")
        if self._last_end_t is not None and t - self._last_end_t < s.min_interval_s:
            return SchedulerDecision("none", "min_interval")
        return self._start("window" if window else "idle")

    def _start(self, reason: str) -> SchedulerDecision:
        self._pending = reason
        return SchedulerDecision("start", reason)

    def _stop_reason(self, t: float) -> str | None:
        s = self.schedule
        elapsed = t - self._sleep_t
        if s.max_duration_s and s.max_duration_s > 0 and elapsed >= s.max_duration_s:
            return "max_duration"
        if self._sleep_reason == "window" and not self.in_window():
            return "window_end"
        if self._sleep_reason == "idle":
            # Only frames since the sleep began count; with idle_rate_hz == 0, any one does.
            since = self._frames - self._sleep_frames0
            span = min(self.preempt_window_s, max(1.0, elapsed))
            recent = min(since, self._recent_ring.count(t, span))
            # + one bucket: the oldest counted bucket may reach back before `span`
            if recent > s.idle_rate_hz * (span + self._recent_ring.width_s):
                return "frames"
        return None

    def stats(self) -> dict[str, Any]:
        t = self._monotonic()
        since = self._last_frame_t if self._last_frame_t is not None else self._created_t
        return {
            "sleeping": self._sleep_reason is not None,
            "sleep_reason": self._sleep_reason,
            "sleep_age_s": round(t - self._sleep_t, 3) if self._sleep_reason else None,
            "sleeps": self._sleeps,
            "slept_s": round(self._slept_s, 3),
            "starts": dict(self._starts),
            "stops": dict(self._stops),
            "requests_dropped": self._requests_dropped,
            "request_pending": self._requested is not None,
            "frames": self._frames,
            "quiet_s": round(t - since, 3),
            "since_last_sleep_s": (round(t - self._last_end_t, 3)
                                   if self._last_end_t is not None else None),
        }
