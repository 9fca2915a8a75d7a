"""Scoring the agent against the simulator's truth, and the demo's report (PNG + JSON).

`Scoreboard` collects what happens during a demo: every prediction is scored against the
runner's ground truth (the majority class of the frames the window covers) at its *stream
time* (the first frame's, ``seq_first * frame_s``), so the numbers do not depend on how
fast the machine ran. Agent events carry wall-clock stamps, which do not map onto stream
time at ``--speed`` > 1; an event is placed instead at the *agent's clock*: the end of the
start of the newest window it has predicted when the event arrives.

A new class's windows are split at its first label the agent confirmed (``label`` event,
``reason`` learned), by arrival order: a prediction that arrived after that event counts
*after* (the agent publishes both in order). Recall *before* is what the base model does
with a class it never saw (about 0), *after* is what learning did. Base classes are split
at the first new-class label, which shows whether learning the new ones cost the old ones.

`write_report` turns a `Scoreboard` into ``<stem>.json`` (`Scoreboard.summary`) and
``<stem>.png``: rolling accuracy over stream time with new-class arrivals, first labels and
sleeps marked, and a per-class recall panel (before / after). matplotlib (the ``train``
extra) is imported only there, with the Agg backend.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from firmware_sim.dashboard import NewClass, Snapshot

RECENT_EVENTS = 4


def rolling_accuracy(correct: np.ndarray, n: int) -> np.ndarray:
    """Mean of the last `n` entries (fewer at the start) at every position.

    >>> rolling_accuracy(np.array([1, 0, 1, 1]), 2).tolist()
    [1.0, 0.5, 0.5, 1.0]
    """
    c = np.concatenate([[0.0], np.cumsum(np.asarray(correct, np.float64))])  # (N + 1,)
    i = np.arange(1, len(c))
    lo = np.maximum(0, i - n)
    return (c[i] - c[lo]) / (i - lo)


def rolling_n_for(expected_windows: float) -> int:
    """A rolling-accuracy span: about a tenth of the run, 20..200 windows."""
    return int(min(200, max(20, expected_windows // 10)))


class Scoreboard:
    """Thread-safe record of a demo run (see the module docstring).

    `truth(device, seq)` is the runner's ground truth (ValueError: not a frame of ours);
    `timeline` the runner's scenario timeline (phases, new-class arrivals, sleeps).
    """

    def __init__(self, *, scenario: str, classes: tuple[str, ...], base_classes: tuple[str, ...],
                 timeline: list[dict], frame_s: float, duration_s: float, devices: int,
                 truth: Callable[[str, int], str], rolling_n: int = 200):
        self.scenario, self.frame_s, self.duration_s = scenario, frame_s, duration_s
        self.classes, self.base_classes, self.devices = classes, base_classes, devices
        self.timeline, self.truth, self.rolling_n = timeline, truth, rolling_n
        self.arrivals = {e["class"]: e["t_s"] for e in timeline if e["type"] == "new_class"}
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self.records: list[tuple[float, str, str, str]] = []  # (stream s, device, truth,
        #                                                         predicted), in arrival order
        self._recent: deque[bool] = deque(maxlen=rolling_n)
        self._arrivals_wall: deque[float] = deque(maxlen=2000)
        self.agent_s = 0.0           # start of the newest predicted window, stream s
        self.stream_s = 0.0          # the simulator's position (`on_frame`), stream s
        self.first_label_s: dict[str, float] = {}  # class -> agent clock at its first learned label
        self.first_label_at: dict[str, int] = {}   # class -> predictions received before it
        self.labels_sent = self.labels_learned = self.label_errors = 0
        self.errors = self.novelty = 0
        self.error_reasons: Counter = Counter()
        self.sleeps: list[dict] = []  # finished: {"t_s", "outcome", "duration_s", ...}
        self.sleep_started: list[float] = []
        self.commands_sent: list[float] = []  # stream s of the runner's sleep commands
        self.memory: tuple[int, int] | None = None
        self.recent: deque[str] = deque(maxlen=RECENT_EVENTS)

    # --- inputs (MQTT and runner threads) --------------------------------------

    def on_prediction(self, body: dict) -> bool:
        """Score one prediction; False if it is not about a frame of ours."""
        try:
            device, first, last = body["device"], int(body["seq_first"]), int(body["seq_last"])
            votes = Counter(self.truth(device, s) for s in range(first, last + 1))
            label = str(body["label"])
        except (KeyError, TypeError, ValueError):
            return False
        truth = votes.most_common(1)[0][0]
        with self._lock:
            self.records.append((first * self.frame_s, device, truth, label))
            self._recent.append(truth == label)
            self._arrivals_wall.append(time.monotonic())
            self.agent_s = max(self.agent_s, first * self.frame_s)
        return True

    def on_event(self, body: dict) -> None:
        """An agent event (docs/protocol.md#events)."""
        kind, reason = body.get("type"), body.get("reason")
        with self._lock:
            t = self.agent_s
            if kind == "label" and reason == "learned":
                self.labels_learned += 1
                label = str(body.get("label"))
                if label not in self.first_label_s:
                    self.first_label_s[label] = t
                    self.first_label_at[label] = len(self.records)
                    if body.get("new_class"):
                        self._note(t, f"learned a new class from a label: {label!r}")
            elif kind == "sleep" and reason == "started":
                self.sleep_started.append(t)
                self._note(t, f"sleep started ({body.get('trigger')})")
            elif kind == "sleep":
                report = body.get("report") or {}
                self.sleeps.append({"t_s": round(t, 2), "outcome": reason,
                                    "duration_s": report.get("duration_s"),
                                    "adapter_version": report.get("adapter_version"),
                                    "detail": body.get("detail")})
                detail = body.get("detail")
                self._note(t, f"sleep {reason}" + (f": {detail}" if detail and detail != reason
                                                   else ""))
            elif kind == "novelty":
                self.novelty += 1
            elif kind == "error":
                self.errors += 1
                self.error_reasons[str(reason)] += 1
                self.label_errors += str(body.get("topic", "")).endswith("/labels")

    def on_frame(self, device: str, seq: int, ts: float, values, cls: str) -> None:
        """The runner generated a frame (engine thread: one float store, no lock)."""
        self.stream_s = (seq + 1) * self.frame_s

    def on_label_sent(self, device: str, payload: dict) -> None:
        with self._lock:
            self.labels_sent += 1

    def on_timeline(self, event: dict) -> None:
        """The runner reached a timeline entry (phase, new class, sleep command, ...)."""
        with self._lock:
            if event["type"] == "sleep":
                self.commands_sent.append(event["t_s"])
            elif event["type"] == "new_class":
                self._note(event["t_s"], f"new class appears: {event['class']!r} "
                                         f"on {event.get('device')}")
            elif event["type"] == "phase":
                self._note(event["t_s"], f"phase {event['name']!r}")

    def set_memory(self, episodes: int, capacity: int) -> None:
        self.memory = (episodes, capacity)

    def _note(self, t_s: float, text: str) -> None:
        self.recent.append(f"{t_s:6.1f} s  {text}")

    # --- views -----------------------------------------------------------------

    def _split(self, cls: str) -> int | None:
        """Index of the first record of `cls` counted *after* (module docstring)."""
        if cls in self.arrivals:
            return self.first_label_at.get(cls)
        firsts = [self.first_label_at[c] for c in self.arrivals if c in self.first_label_at]
        return min(firsts) if firsts else None

    def _counts(self) -> tuple[dict[str, list[int]], dict[str, list[int]], dict[str, list[int]]]:
        """Per class: [correct, n] over all, before and after its split."""
        total = {c: [0, 0] for c in self.classes}
        before = {c: [0, 0] for c in self.classes}
        after = {c: [0, 0] for c in self.classes}
        splits = {c: self._split(c) for c in self.classes}
        for i, (_, _, truth, label) in enumerate(self.records):
            ok = int(truth == label)
            part = before if splits.get(truth) is None or i < splits[truth] else after
            for d in (total, part):
                d.setdefault(truth, [0, 0])
                d[truth][0] += ok
                d[truth][1] += 1
        return total, before, after

    def phase_at(self, t_s: float) -> str:
        phases = [e for e in self.timeline if e["type"] == "phase" and e["t_s"] <= t_s]
        return phases[-1]["name"] if phases else "-"

    def snapshot(self) -> Snapshot:
        with self._lock:
            total, before, after = self._counts()
            now = time.monotonic()
            recent = [t for t in self._arrivals_wall if t >= now - 5.0]
            span = min(5.0, now - self._t0)
            t = max(self.stream_s, self.agent_s)
            n_ok = sum(total[c][0] for c in total)
            n = sum(total[c][1] for c in total)
            return Snapshot(
                scenario=self.scenario, elapsed_wall_s=now - self._t0, stream_s=t,
                duration_s=self.duration_s, phase=self.phase_at(t),
                predictions=len(self.records), devices_seen=len({r[1] for r in self.records}),
                devices=self.devices, accuracy=n_ok / n if n else None,
                rolling=sum(self._recent) / len(self._recent) if self._recent else None,
                rolling_n=self.rolling_n,
                recall={c: (v[0], v[1]) for c, v in total.items() if v[1]},
                base_classes=self.base_classes,
                new_classes={c: NewClass(a, self.first_label_s.get(c), tuple(before[c]),
                                         tuple(after[c]))
                             for c, a in self.arrivals.items() if a <= t},
                memory=self.memory,
                sleeps=tuple((s["t_s"], s["outcome"]) for s in self.sleeps),
                sleeping=len(self.sleep_started) > len(self.sleeps),
                windows_per_s=len(recent) / span if span > 0 else 0.0,
                labels_sent=self.labels_sent, labels_learned=self.labels_learned,
                errors=self.errors, novelty=self.novelty, recent=tuple(self.recent))

    def summary(self) -> dict:
        """The JSON summary's measurements (`write_report` adds paths and timings)."""
        with self._lock:
            total, before, after = self._counts()
            records = list(self.records)
            base_split = self._split(self.base_classes[0]) if self.base_classes else None
            first_label_s = dict(self.first_label_s)

        def acc(rows: list) -> float | None:
            return round(sum(r[2] == r[3] for r in rows) / len(rows), 4) if rows else None

        def ratio(pair: list[int]) -> float | None:
            return round(pair[0] / pair[1], 4) if pair[1] else None

        if base_split is None:
            base_split = len(records)
        base = [r for r in records if r[2] in self.base_classes]
        base_before = [r for r in records[:base_split] if r[2] in self.base_classes]
        base_after = [r for r in records[base_split:] if r[2] in self.base_classes]
        per_device = Counter(r[1] for r in records)
        outcomes = Counter(s["outcome"] for s in self.sleeps)
        return {
            "windows": len(records),
            "per_device": dict(sorted(per_device.items())),
            "accuracy": {
                "overall": acc(records),
                "final_rolling": acc(records[-self.rolling_n:]),
                "rolling_n": self.rolling_n,
                "base": acc(base),
                "base_before_new_labels": acc(base_before),
                "base_after_new_labels": acc(base_after),
                "new_classes": {c: {"arrival_s": round(a, 2),
                                    "first_label_learned_s": (round(first_label_s[c], 2)
                                                              if c in first_label_s else None),
                                    "recall_before_label": ratio(before[c]),
                                    "windows_before_label": before[c][1],
                                    "recall_after_label": ratio(after[c]),
                                    "windows_after_label": after[c][1]}
                                for c, a in self.arrivals.items()},
            },
            "per_class_recall": {c: {"recall": ratio(v), "windows": v[1],
                                     "recall_before": ratio(before[c]),
                                     "recall_after": ratio(after[c])}
                                 for c, v in total.items()},
            "sleeps": {"commanded_at_s": self.commands_sent, "started": len(self.sleep_started),
                       "accepted": outcomes["accepted"], "rolled_back": outcomes["rolled_back"],
                       "other": sum(v for k, v in outcomes.items()
                                    if k not in ("accepted", "rolled_back")),
                       "runs": self.sleeps},
            "labels": {"sent": self.labels_sent, "learned": self.labels_learned,
                       "failed": self.label_errors, "classes_learned": sorted(first_label_s)},
            "memory": (None if self.memory is None else
                       {"episodes": self.memory[0], "capacity": self.memory[1]}),
            "novelty_events": self.novelty,
            "error_events": self.errors,
            "error_reasons": dict(self.error_reasons),
        }


def write_report(board: Scoreboard, out_dir: Path, stem: str, extra: dict | None = None
                 ) -> tuple[Path, Path]:
    """Write ``out_dir/<stem>.png`` and ``out_dir/<stem>.json``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png, js = out_dir / f"{stem}.png", out_dir / f"{stem}.json"
    summary = {"scenario": board.scenario, **(extra or {}), **board.summary()}
    summary["paths"] = {**summary.get("paths", {}), "png": str(png), "json": str(js)}
    plot_report(board, summary, png)
    js.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return png, js


def plot_report(board: Scoreboard, summary: dict, path: Path) -> Path:
    """The PNG: rolling accuracy over stream time (events marked) and per-class recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with board._lock:
        records = sorted(board.records)
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(11, 8), height_ratios=[3, 2])
    fig.suptitle(f"reverie demo: {board.scenario}  (overall accuracy "
                 f"{_fmt(summary['accuracy']['overall'])}, {len(records)} windows)")
    if records:
        t = np.array([r[0] for r in records])
        ok = np.array([r[2] == r[3] for r in records])
        ax.plot(t, rolling_accuracy(ok, board.rolling_n), color="tab:blue", lw=1.8,
                label=f"accuracy, last {board.rolling_n} windows")
        new = np.array([r[2] in board.arrivals for r in records])
        if new.any():
            ax.plot(t[new], rolling_accuracy(ok[new], max(5, board.rolling_n // 4)),
                    color="tab:orange", lw=1.2, alpha=0.8,
                    label=f"new classes' recall, last {max(5, board.rolling_n // 4)} of theirs")
    for e in board.timeline:
        if e["type"] == "phase" and e["t_s"] > 0:
            ax.axvline(e["t_s"], color="0.8", lw=0.8)
        if e["type"] == "phase":
            ax.text(e["t_s"], 1.02, f" {e['name']}", fontsize=8, color="0.4",
                    transform=ax.get_xaxis_transform())
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"][2:]
    for i, (cls, a) in enumerate(board.arrivals.items()):
        c = colors[i % len(colors)]
        ax.axvline(a, color=c, ls="--", lw=1.5, label=f"new class '{cls}' arrives")
        if cls in board.first_label_s:
            ax.axvline(board.first_label_s[cls], color=c, ls=":", lw=1.5,
                       label=f"first '{cls}' label learned")
    seen: set[str] = set()
    for s in board.sleeps:
        ax.axvline(s["t_s"], color="tab:green" if s["outcome"] == "accepted" else "tab:red",
                   lw=2, alpha=0.7,
                   label=None if s["outcome"] in seen else f"sleep {s['outcome']}")
        seen.add(s["outcome"])
    ax.set_xlim(0, board.duration_s)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("stream time (s)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=8)

    per = summary["per_class_recall"]
    names = [c for c in board.classes if c in per]
    x = np.arange(len(names))
    for k, (key, lab, col) in enumerate((
            ("recall_before", "before its first label (base: before the first new-class label)",
             "tab:gray"),
            ("recall_after", "after", "tab:blue"))):
        vals = [per[c][key] if per[c][key] is not None else np.nan for c in names]
        bx.bar(x + (k - 0.5) * 0.38, vals, width=0.38, color=col, label=lab)
    bx.set_xticks(x, [f"{c}\n(new)" if c in board.arrivals else c for c in names])
    bx.set_ylim(0, 1.3)  # headroom for the legend
    bx.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    bx.set_ylabel("recall")
    bx.grid(axis="y", alpha=0.3)
    if names:
        bx.legend(loc="upper center", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def summary_lines(s: dict) -> list[str]:
    """The JSON summary in a few lines for the terminal."""
    a, sl = s["accuracy"], s["sleeps"]
    d = s["durations_s"]
    out = [f"done in {d['total']:.0f} s (training {d['training']:.0f} s, stream "
           f"{d['stream_wall']:.0f} s): {s['windows']} windows, accuracy {_fmt(a['overall'])} "
           f"overall, {_fmt(a['final_rolling'])} over the last {a['rolling_n']}",
           f"base classes: {_fmt(a['base_before_new_labels'])} before the first new-class "
           f"label, {_fmt(a['base_after_new_labels'])} after"]
    for cls, n in a["new_classes"].items():
        when = ("never labelled during the run" if n["first_label_learned_s"] is None
                else f"first label learned at {n['first_label_learned_s']:.0f} s")
        out.append(f"new class {cls!r}: arrived at {n['arrival_s']:.0f} s, {when}; recall "
                   f"{_fmt(n['recall_before_label'])} before ({n['windows_before_label']} "
                   f"windows) -> {_fmt(n['recall_after_label'])} after "
                   f"({n['windows_after_label']} windows)")
    out += [f"sleeps: {sl['accepted']} accepted, {sl['rolled_back']} rolled back; labels "
            f"{s['labels']['sent']} sent, {s['labels']['learned']} learned; "
            f"{s['throughput']['windows_per_s']} windows/s",
            f"report: {s['paths']['png']}",
            f"summary: {s['paths']['json']}"]
    return out
