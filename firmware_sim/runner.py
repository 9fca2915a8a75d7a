"""Run a `Scenario` against a broker: devices, impairments, network, labels, sleeps, truth.

Every device ``i`` (ids ``sim-000``, ``sim-001``, ...) owns, seeded from the scenario seed
and its index: a `Source` of the scenario's sensor model, a class schedule, a
`DeviceImpairment`, a `NetworkShaper` and an `Oracle`. Everything it sends is a function of
the scenario (and `start_ts`), never of timing, so two runs send the same payloads.

Class schedule. Each phase is filled with *bouts* whose lengths are drawn uniformly from the
phase's ``segment_s`` and whose classes are drawn from its mix, all rounded to whole frames
(a frame never spans two classes; phases start on the frame nearest their start time, and a
bout is cut at its phase's end). Every bout is a new `Source.set_class` (even of the same
class: another pace, another intensity). A *segment* is a run of bouts of one class: the
ground truth and the unit the oracle labels. The whole schedule is drawn up front, so the
truth of any frame (`truth`, `truth_at`, `truth_ts`) and the scenario's event timeline
(`timeline`) are known before the run starts.

A frame's journey: samples come from the source in blocks of about `BLOCK_SAMPLES` (never
across a bout), generated ahead, which amortises numpy's per-call cost over many frames;
the devices' first blocks have staggered lengths, so their refills never all fall into the
same frame period (200 devices refilling at once would stall the loop for ~100 ms); the
impairment
turns the block into what a worn sensor reports; the frame is encoded (binary by default);
a device in a *dropout* fault sends nothing; the network shaper decides what is published
(nothing while disconnected, lost bursts, duplicates, reordering, malformed payloads).
Frames generated during a disconnect are lost, as on a device that streams live over QoS 0
without an outbox; ``outbox_s > 0`` models a device-side ring buffer instead: up to that
much stream time of frames is kept and sent in one burst at the reconnect (oldest dropped
first), which is how an agent sees a backlog of stale frames.

Labels. When a segment ends the device's oracle decides whether and when (``due_s``) it is
labelled. The label is a time range on ``{prefix}/{device}/labels`` (QoS 1), and it names
the windows whose *majority* lies in the segment: the agent labels every window whose first
sample's ts is in ``[from_ts, to_ts]``, so the range is the segment shifted back by half an
agent window (``window_samples``), less a quarter sample at each end (`label_range`). Whatever
the agent's window phase, no label covers a window that is mostly another class and every
labelled segment covers at least one window: segments no longer than a window (which may
hold no window start) are never labelled. Labels still due after the last frame (the
final segments') are sent on time after it: the run ends with the last label.

Sleeps: ``{"cmd": "sleep"}`` (QoS 1) to the first device's ``cmd`` topic at each of
``scenario.sleep_at_s``: one command is enough, since a sleep consolidates every learner of
the agent (a gateway with a shared learner serves all devices from ``+/cmd``).

Callbacks (called from the engine's thread; keep them quick): ``on_frame(device, seq, ts,
values, cls)`` for every frame generated (sent or not), ``on_label(device, payload)`` when
a label is published, ``on_event(event)`` when the stream reaches an entry of `timeline`
(dicts with ``type`` "phase" | "new_class" | "sleep" | "disconnect" | "fault", ``t_s`` and
``ts``).
"""

from __future__ import annotations

import bisect
import heapq
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from agent.errors import ConfigError
from agent.topics import DEFAULT_PREFIX, Topics
from firmware_sim.engine import Engine, EngineDriven
from firmware_sim.impair import DeviceImpairment, NetworkShaper, Oracle
from firmware_sim.scenario import Scenario, load_scenario
from firmware_sim.sensors import get_model
from firmware_sim.sim import ENCODERS, FrameCallback

# Samples generated per source call (whole frames, never across a bout): a call costs
# ~65 us + ~0.75 us per sample for the IMU model, so 512-sample blocks bring a 16-sample
# frame from ~70 us to ~13 us, while one refill (~0.45 ms) stays well under a frame period.
BLOCK_SAMPLES = 512

LabelCallback = Callable[[str, dict], None]
EventCallback = Callable[[dict], None]


def label_range(start_ts: float, end_ts: float, window_s: float, rate_hz: float
                ) -> tuple[float, float] | None:
    """``(from_ts, to_ts)`` naming the windows whose majority lies in ``[start_ts, end_ts)``
    (see the module docstring), or None for a segment no longer than a window.

    A window starting at ``s`` has ``min(s + W, end) - max(s, start)`` of the segment: more
    than ``W / 2`` exactly when ``start - W / 2 < s < end - W / 2`` and the segment is
    longer than ``W / 2``. That open range is as long as the segment, and the agent starts
    a window every ``W`` (its default hop), so a segment longer than a window always holds
    one, whatever the agent's window phase; one of at most a window may hold none (exactly
    a window: the window that straddles it half and half), and a label naming no window is
    refused (``unknown_window``): such segments get no label. Window starts
    lie on the sample grid and the range's ends on it or halfway between, so a quarter
    sample of margin turns the open interval into the closed range the agent uses, with no
    window start near either bound.
    """
    if round((end_ts - start_ts) * rate_hz) <= round(window_s * rate_hz):  # in samples
        return None
    quarter = 0.25 / rate_hz
    return start_ts - window_s / 2 + quarter, end_ts - window_s / 2 - quarter


def draw_bouts(scenario: Scenario, rng: np.random.Generator, frame_s: float
               ) -> list[tuple[int, str]]:
    """``[(first frame, class), ...]`` of one device over the whole scenario."""
    bouts = []
    for start, phase in zip(scenario.phase_starts_s, scenario.phases, strict=True):
        f, f_end = round(start / frame_s), round((start + phase.duration_s) / frame_s)
        classes = list(phase.mix)
        cum = np.cumsum([phase.mix[c] for c in classes])
        while f < f_end:
            length = max(1, round(rng.uniform(*phase.segment_s) / frame_s))
            u = rng.random() * cum[-1]
            bouts.append((f, classes[min(int(np.searchsorted(cum, u, "right")), len(classes) - 1)]))
            f += length
    return bouts


class _Device:
    """One device's state while the scenario runs."""

    def __init__(self, runner: ScenarioRunner, index: int, seed: np.random.SeedSequence):
        sc, model = runner.scenario, runner.model
        self.name = f"sim-{index:03d}"
        self.topics = Topics(self.name, runner.prefix)
        self.frames_topic = self.topics.frames
        source_seed, schedule_seed, impair_seed, net_seed, oracle_seed = seed.spawn(5)
        self.bouts = draw_bouts(sc, np.random.default_rng(schedule_seed), runner.frame_s)
        self.bout_starts = [f for f, _ in self.bouts] + [runner.n_frames]
        runs: list[list] = []  # [first frame, end frame, class]: merged same-class bouts
        for (f, cls), end in zip(self.bouts, self.bout_starts[1:], strict=True):
            if runs and runs[-1][2] == cls:
                runs[-1][1] = end
            else:
                runs.append([f, end, cls])
        self.runs = [tuple(r) for r in runs]
        self.run_starts = [r[0] for r in self.runs]
        self.run_ends = {r[1] - 1: r for r in self.runs}  # last frame -> segment
        self.source = model.source(self.bouts[0][1], source_seed)
        self.impair = DeviceImpairment(sc, index, len(model.channels), model.rate_hz, impair_seed)
        self.shaper = NetworkShaper(sc.network, net_seed)
        self.oracle = Oracle(sc.labels, oracle_seed)
        self.bout = 0  # index of the bout being generated
        # staggered first block (1..block_frames frames): spreads the refills of the fleet
        b = runner.block_frames
        self.next_block = b - index * b // runner.scenario.devices
        self.block = np.zeros((0, len(model.channels)), np.float32)
        self.block_k = 0  # frame index of the block's first frame
        self.outbox: deque[bytes] = deque(maxlen=max(0, round(runner.outbox_s / runner.frame_s)))
        self.silent = 0  # frames not sent during dropout faults

    def frames(self, k: int, runner: ScenarioRunner) -> np.ndarray:
        """Frame `k`'s values (S, C): refills the block, switching bouts on their frame."""
        fs = runner.frame_samples
        j = k - self.block_k
        if j * fs >= len(self.block):
            if k == self.bout_starts[self.bout + 1]:
                self.bout += 1
                self.source.set_class(self.bouts[self.bout][1])
            n = min(self.next_block, self.bout_starts[self.bout + 1] - k)
            self.next_block = runner.block_frames
            raw = self.source.read(n * fs)  # (n * S, C)
            self.block = self.impair.apply(raw, k * runner.frame_s)
            self.block_k, j = k, 0
        return self.block[j * fs:(j + 1) * fs]


class ScenarioRunner(EngineDriven):
    """A scenario's devices publishing through one engine; see the module docstring.

    `scenario` is a Scenario, a shipped name or a TOML path. `devices` overrides the
    scenario's device count. `run` blocks and returns the engine's `SimStats`; `start` /
    `stop` / `join` run it in a background thread; `dry_run` yields what would be
    published, without a broker. A runner runs once.

    >>> r = ScenarioRunner("smoke", "mqtt://127.0.0.1:1883", speed=4)  # doctest: +SKIP
    >>> stats = r.run()                                                   # doctest: +SKIP
    >>> r.truth("sim-000", 10), r.summary()["labels_sent"]                # doctest: +SKIP
    ('run', 4)
    """

    def __init__(self, scenario: Scenario | str | Path, broker_url: str, *,
                 prefix: str = DEFAULT_PREFIX, protocol: str = "5", speed: float = 1.0,
                 devices: int | None = None, encoding: str = "binary",
                 start_ts: float | None = None, outbox_s: float = 0.0,
                 connect_timeout_s: float = 5.0, on_frame: FrameCallback | None = None,
                 on_label: LabelCallback | None = None, on_event: EventCallback | None = None):
        sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        if devices is not None:
            if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
                raise ConfigError(f"Invalid devices: {devices!r} (expected a count >= 1)")
            sc = replace(sc, devices=devices)
        if encoding not in ENCODERS:
            raise ConfigError(f"Invalid encoding: {encoding!r} "
                              f"(expected one of {sorted(ENCODERS)})")
        if not outbox_s >= 0:
            raise ConfigError(f"Invalid outbox_s: {outbox_s!r} (expected seconds >= 0)")
        try:
            Topics("sim-000", prefix)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.scenario = sc
        self.model = get_model(sc.model, **sc.model_params)
        self.rate_hz = float(self.model.rate_hz)
        self.frame_samples = sc.frame_samples
        self.frame_s = sc.frame_samples / self.rate_hz
        self.window_s = sc.window_samples / self.rate_hz
        self.n_frames = max(1, round(sc.duration_s / self.frame_s))  # per device
        self.block_frames = max(1, round(BLOCK_SAMPLES / sc.frame_samples))
        self.prefix, self.start_ts, self.outbox_s = prefix, start_ts, outbox_s
        self.on_frame, self.on_label, self.on_event = on_frame, on_label, on_event
        self._encode = ENCODERS[encoding]
        seeds = np.random.SeedSequence(sc.seed).spawn(sc.devices)
        self._devices = [_Device(self, i, s) for i, s in enumerate(seeds)]
        self._by_name = {d.name: d for d in self._devices}
        self.devices = tuple(self._by_name)
        self.timeline = self._timeline()
        self._next_event = 0
        self._labels: list = []  # heap of (due stream s, n, device index, payload)
        self._n_labels = 0
        self.labels_sent = self.sleeps_sent = 0
        self._flushed = False
        self._t0: float | None = None
        self.engine = Engine(broker_url, self.devices, self._produce, rate_hz=self.rate_hz,
                             frame_samples=sc.frame_samples, speed=speed,
                             max_frames=self.n_frames, finish=self._finish,
                             protocol=protocol, connect_timeout_s=connect_timeout_s,
                             name="reverie-scenario")

    # --- schedule and truth ----------------------------------------------------

    def _timeline(self) -> list[dict]:
        sc = self.scenario
        ev = [{"type": "phase", "t_s": t, "name": p.name, "index": j}
              for j, (t, p) in enumerate(zip(sc.phase_starts_s, sc.phases, strict=True))]
        for cls, phase_start in sc.new_classes().items():
            first = min(((f, d.name) for d in self._devices for f, c in d.bouts if c == cls),
                        default=None)
            if first is not None:  # the first frame of the class on any device
                ev.append({"type": "new_class", "t_s": first[0] * self.frame_s, "class": cls,
                           "device": first[1], "phase_start_s": phase_start})
        ev += [{"type": "sleep", "t_s": t} for t in sc.sleep_at_s]
        ev += [{"type": "disconnect", "t_s": s, "duration_s": d} for s, d in sc.network.disconnects]
        ev += [{"type": "fault", "t_s": f.start_s, "kind": f.kind, "duration_s": f.duration_s}
               for f in sc.faults]
        return sorted(ev, key=lambda e: e["t_s"])

    def _device(self, device: str) -> _Device:
        try:
            return self._by_name[device]
        except KeyError:
            raise ValueError(f"Unknown device: {device!r} (simulating {self.devices[0]}.."
                             f"{self.devices[-1]})") from None

    def truth(self, device: str, seq: int) -> str:
        """The class of frame `seq` of `device` (known for the whole scenario up front)."""
        d = self._device(device)
        if not 0 <= seq < self.n_frames:
            raise ValueError(f"No ground truth for {device} frame {seq} "
                             f"(expected 0..{self.n_frames - 1})")
        return d.runs[bisect.bisect_right(d.run_starts, seq) - 1][2]

    def truth_at(self, device: str, sample_index: int) -> str:
        """The class of sample `sample_index` (from 0) of `device`."""
        return self.truth(device, sample_index // self.frame_samples)

    def truth_ts(self, device: str, ts: float) -> str:
        """The class at wire timestamp `ts` (known once the run started, or with start_ts)."""
        t0 = self._t0 if self._t0 is not None else self.start_ts
        if t0 is None:
            raise ValueError("truth_ts: the stream's start time is known once the run starts")
        return self.truth_at(device, int(np.floor((ts - t0) * self.rate_hz + 1e-6)))

    def segments(self, device: str) -> list[tuple[float, float, str]]:
        """``(start_s, end_s, class)`` in stream seconds of every segment of `device`."""
        return [(f * self.frame_s, e * self.frame_s, c)
                for f, e, c in self._device(device).runs]

    # --- running: EngineDriven (run, start, stop, join, dry_run) ----------------

    def summary(self) -> dict:
        """Counts of what the devices did (so far), summed over devices."""
        shaped = [d.shaper.stats for d in self._devices]
        keys = ("offered", "sent", "lost_disconnected", "lost_burst", "duplicated",
                "reordered", "malformed")
        return {"devices": len(self._devices), "labels_sent": self.labels_sent,
                "labels_pending": len(self._labels),
                "sleeps_sent": self.sleeps_sent,
                "frames_silent": sum(d.silent for d in self._devices),
                **{f"frames_{k}": sum(getattr(s, k) for s in shaped) for k in keys}}

    def _produce(self, i: int, k: int, t_s: float, out: list) -> None:
        if self._t0 is None:
            self._t0 = time.time() if self.start_ts is None else self.start_ts
        self._due(t_s, out)
        d = self._devices[i]
        values = d.frames(k, self)
        t_frame = k * self.frame_s  # stream time of the frame's first sample
        ts = self._t0 + t_frame
        if d.impair.silent(t_frame):
            d.silent += 1
        else:
            payload = self._encode(k, ts, values)
            connected = d.shaper.connected(t_frame)
            if connected and d.outbox:
                out.extend((d.frames_topic, p, 0, i) for p in d.outbox)
                d.outbox.clear()
            out.extend((d.frames_topic, p, 0, i) for p in d.shaper.shape(k, payload, t_frame))
            if not connected and d.outbox.maxlen:
                d.outbox.append(payload)
        cls = d.runs[bisect.bisect_right(d.run_starts, k) - 1][2]
        if self.on_frame is not None:
            self.on_frame(d.name, k, ts, values, cls)
        seg = d.run_ends.get(k)
        if seg is not None:
            start_ts, end_ts = self._t0 + seg[0] * self.frame_s, self._t0 + seg[1] * self.frame_s
            span = label_range(start_ts, end_ts, self.window_s, self.rate_hz)
            label = span and d.oracle.segment(d.name, seg[2], start_ts, end_ts,
                                              self.scenario.classes)
            if label:
                payload = dict(label["payload"])
                payload["from_ts"], payload["to_ts"] = span
                self._n_labels += 1
                heapq.heappush(self._labels, (label["due_s"] - self._t0, self._n_labels, i,
                                              payload))

    def _due(self, t_s: float, out: list) -> None:
        """Labels and timeline entries due at stream time `t_s`."""
        while self._labels and self._labels[0][0] <= t_s:
            _, _, i, payload = heapq.heappop(self._labels)
            d = self._devices[i]
            out.append((d.topics.labels, json.dumps(payload, separators=(",", ":")).encode(),
                        1, -1))
            self.labels_sent += 1
            if self.on_label is not None:
                self.on_label(d.name, payload)
        timeline = self.timeline
        while self._next_event < len(timeline) and timeline[self._next_event]["t_s"] <= t_s:
            ev = timeline[self._next_event]
            ev = dict(ev, ts=self._t0 + ev["t_s"])
            self._next_event += 1
            if ev["type"] == "sleep":
                out.append((self._devices[0].topics.cmd, b'{"cmd":"sleep"}', 1, -1))
                self.sleeps_sent += 1
            if self.on_event is not None:
                self.on_event(ev)

    def _finish(self, t_s: float, out: list) -> float | None:
        """After the last frame: release held frames, then the labels still due."""
        if not self._flushed:
            self._flushed = True
            for i, d in enumerate(self._devices):
                out.extend((d.frames_topic, p, 0, i) for p in d.shaper.flush())
        self._due(t_s, out)
        return self._labels[0][0] if self._labels else None
