"""The demo's live terminal dashboard: a `Snapshot` in, text out, redrawn twice a second.

`render(snapshot)` and `log_line(snapshot)` are pure functions (tests feed them synthetic
snapshots); `Dashboard` is the thread that asks the scoreboard for a snapshot and draws it.
On a terminal it redraws the block in place with plain ANSI escapes (cursor up, clear to
end of line): the final state stays on screen and in the scrollback, and no dependency is
needed. When stdout is not a terminal (a pipe, CI, ``--quiet``) it prints one log line
every `log_every_s` instead, so a log file reads like a story rather than a screen dump.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

BAR_WIDTH = 20
_RESET, _BOLD, _DIM, _RED, _GREEN, _YELLOW, _CYAN = (
    "\x1b[0m", "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[36m")


@dataclass(frozen=True)
class NewClass:
    """A class the base model was not trained on, as the demo saw it so far."""

    arrival_s: float                  # stream time of its first frame on any device
    first_label_s: float | None       # stream time its first label was learned (None: not yet)
    before: tuple[int, int] = (0, 0)  # (correct, windows) before that label
    after: tuple[int, int] = (0, 0)   # (correct, windows) after it


@dataclass(frozen=True)
class Snapshot:
    """Everything the dashboard shows; times are stream seconds unless `_wall` says so."""

    scenario: str
    elapsed_wall_s: float
    stream_s: float
    duration_s: float
    phase: str
    predictions: int
    devices_seen: int
    devices: int
    accuracy: float | None            # over every scored window
    rolling: float | None             # over the last `rolling_n`
    rolling_n: int
    recall: dict[str, tuple[int, int]]  # class -> (correct, windows), in display order
    base_classes: tuple[str, ...]
    new_classes: dict[str, NewClass] = field(default_factory=dict)
    memory: tuple[int, int] | None = None   # (episodes, capacity) from /metrics
    sleeps: tuple[tuple[float, str], ...] = ()  # (stream s, outcome) of finished sleeps
    sleeping: bool = False
    windows_per_s: float = 0.0        # predictions per wall second, recently
    labels_sent: int = 0
    labels_learned: int = 0
    errors: int = 0
    novelty: int = 0
    recent: tuple[str, ...] = ()      # the last few notable events, oldest first


def _pct(x: float | None) -> str:
    return "   -  " if x is None else f"{x:6.1%}"


def _ratio(pair: tuple[int, int]) -> float | None:
    return pair[0] / pair[1] if pair[1] else None


def _bar(x: float | None, width: int = BAR_WIDTH) -> str:
    if x is None:
        return "." * width
    full = min(width, max(0, round(x * width)))
    return "#" * full + "." * (width - full)


def _paint(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{_RESET}" if color else text


def _shade(x: float | None, color: bool, text: str) -> str:
    if x is None:
        return _paint(text, _DIM, color)
    return _paint(text, _GREEN if x >= 0.8 else _YELLOW if x >= 0.5 else _RED, color)


def render(s: Snapshot, *, color: bool = False) -> str:
    """The dashboard as text (ANSI colours with `color`), one line per row, no trailing newline.

    >>> snap = Snapshot("smoke", 3.0, 6.0, 30.0, "base", 5, 2, 2, 0.8, 0.8, 20,
    ...                 {"idle": (4, 5)}, ("idle",))
    >>> render(snap).splitlines()[0]
    'reverie demo | smoke | stream 6/30 s (20%) | phase: base | wall 3 s'
    """
    progress = s.stream_s / s.duration_s if s.duration_s > 0 else 0.0
    lines = [
        f"reverie demo | {s.scenario} | stream {s.stream_s:.0f}/{s.duration_s:.0f} s "
        f"({progress:.0%}) | phase: {s.phase} | wall {s.elapsed_wall_s:.0f} s",
        f"accuracy  last {s.rolling_n:<4d} {_shade(s.rolling, color, _pct(s.rolling))} "
        f"{_shade(s.rolling, color, _bar(s.rolling))}   all {_pct(s.accuracy)}   "
        f"windows {s.predictions} from {s.devices_seen}/{s.devices} devices",
        "per-class recall (since start)",
    ]
    for cls, pair in s.recall.items():
        r = _ratio(pair)
        tag = "base" if cls in s.base_classes else "NEW "
        row = f"  {cls:<14} {tag} {_shade(r, color, _pct(r))} {_shade(r, color, _bar(r))} " \
              f"{pair[0]:>5}/{pair[1]:<5}"
        nc = s.new_classes.get(cls)
        if nc is not None:
            if nc.first_label_s is None:
                row += f" arrived {nc.arrival_s:.0f} s, no label learned yet"
            else:
                row += (f" arrived {nc.arrival_s:.0f} s, labelled {nc.first_label_s:.0f} s: "
                        f"{_pct(_ratio(nc.before)).strip()} before -> "
                        f"{_pct(_ratio(nc.after)).strip()} after")
        lines.append(row)
    for cls, nc in s.new_classes.items():
        if cls not in s.recall:
            lines.append(f"  {cls:<14} NEW  (arrives at {nc.arrival_s:.0f} s)")
    mem = "-" if s.memory is None else \
        f"{s.memory[0]}/{s.memory[1]} episodes ({s.memory[0] / max(1, s.memory[1]):.1%})"
    outcomes = [o for _, o in s.sleeps]
    sleeps = f"{len(outcomes)} done ({outcomes.count('accepted')} accepted, " \
             f"{outcomes.count('rolled_back')} rolled back)" + (", sleeping now" if s.sleeping else "")
    lines += [
        f"memory    {mem}",
        f"sleeps    {sleeps}",
        f"labels    {s.labels_sent} sent, {s.labels_learned} learned   "
        f"throughput {s.windows_per_s:.1f} windows/s   novelty {s.novelty}   errors {s.errors}",
    ]
    if s.recent:
        lines.append("recent")
        lines += [_paint(f"  {e}", _CYAN, color) for e in s.recent]
    lines[0] = _paint(lines[0], _BOLD, color)
    return "\n".join(lines)


def log_line(s: Snapshot) -> str:
    """One line for logs (not a terminal, or ``--quiet``).

    >>> snap = Snapshot("smoke", 3.0, 6.0, 30.0, "base", 5, 2, 2, 0.8, 0.8, 20,
    ...                 {"idle": (4, 5)}, ("idle",))
    >>> log_line(snap)
    '[demo] stream 6/30 s (base) windows 5 acc 80.0% (last 20: 80.0%) memory - sleeps 0 labels 0/0 0.0 windows/s'
    """
    mem = "-" if s.memory is None else f"{s.memory[0]}/{s.memory[1]}"
    new = "".join(f" {c}: {_pct(_ratio(nc.after)).strip()} after label"
                  for c, nc in s.new_classes.items() if nc.first_label_s is not None)
    return (f"[demo] stream {s.stream_s:.0f}/{s.duration_s:.0f} s ({s.phase}) windows "
            f"{s.predictions} acc {_pct(s.accuracy).strip()} (last {s.rolling_n}: "
            f"{_pct(s.rolling).strip()}) memory {mem} sleeps {len(s.sleeps)} labels "
            f"{s.labels_sent}/{s.labels_learned} {s.windows_per_s:.1f} windows/s{new}")


class Dashboard:
    """Draws `snapshot()` every `interval_s` in a background thread until `stop`.

    ``live`` (default: `out` is a terminal) redraws in place; otherwise a `log_line`
    every `log_every_s`.
    """

    def __init__(self, snapshot: Callable[[], Snapshot], *, out: TextIO | None = None,
                 live: bool | None = None, interval_s: float = 0.5, log_every_s: float = 5.0):
        self.snapshot = snapshot
        self.out = out or sys.stdout
        self.live = self.out.isatty() if live is None else live
        self.interval_s, self.log_every_s = interval_s, log_every_s
        self._lines_drawn = 0
        self._last_log = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reverie-dashboard", daemon=True)

    def start(self) -> Dashboard:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and draw the final state once more (live mode)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.live:
            self.draw()

    def draw(self) -> None:
        text = render(self.snapshot(), color=True)
        up = f"\x1b[{self._lines_drawn}F" if self._lines_drawn else ""
        body = "\n".join(line + "\x1b[K" for line in text.split("\n"))
        self.out.write(f"{up}{body}\n\x1b[J")
        self.out.flush()
        self._lines_drawn = text.count("\n") + 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.live:
                    self.draw()
                elif time.monotonic() - self._last_log >= self.log_every_s:
                    self._last_log = time.monotonic()
                    print(log_line(self.snapshot()), file=self.out, flush=True)
            except (OSError, ValueError):  # stdout closed under us: stop drawing
                return
