"""Replay an NPZ dataset as one device's sensor stream, with its labels through the oracle.

The dataset (`agent.dataset` format; every window of ``X`` and ``X_test``, ``(N, C, T)``)
becomes a stream: the windows in a seeded order, concatenated, cut into frames of
`frame_samples` (frames run across window boundaries; a tail shorter than a frame is
dropped). With `loop` the stream goes on with the next pass, each pass in its own seeded
order; the frames, their seq and ts simply continue.

Ground truth is the class of each window; a *segment* is a run of consecutive windows of
one class (runs meet across passes too). When the stream passes a segment's end, an
`Oracle` (`labels` = the fraction labelled, `label_delay_s`, no label noise) decides whether
and when its label is published, as a time range over the windows wholly inside the run:
``[start, end - T]`` (a quarter sample of margin each side). An agent whose window is the
dataset's ``T`` and that sees the stream from its first frame cuts exactly the dataset's
windows, so each label names exactly the windows of its run (unlike a scenario's segments,
whose boundaries fall anywhere in the agent's windows: `firmware_sim.runner.label_range`).
Pacing, publishing and rate accounting are the engine's (`firmware_sim.engine`).

>>> r = Replay("data/imu.npz", "mqtt://127.0.0.1:1883", device="rec-1")  # doctest: +SKIP
>>> stats = r.run()                                                       # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import heapq
import json
import threading
import time
from pathlib import Path

import numpy as np

from agent.dataset import load_dataset
from agent.errors import ConfigError, DatasetError
from agent.protocol import MAX_CHANNELS, MAX_SAMPLES
from agent.topics import DEFAULT_PREFIX, Topics
from firmware_sim.engine import Engine, EngineDriven
from firmware_sim.impair import Oracle
from firmware_sim.runner import LabelCallback
from firmware_sim.scenario import LabelOracle
from firmware_sim.sim import ENCODERS, FrameCallback


def load_windows(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], float | None]:
    """Every window of an NPZ dataset: ``(X (N, C, T) float32, y (N,), classes, rate)``;
    DatasetError if the file is not a dataset of windows."""
    ds = load_dataset(path)
    if ds.X.ndim != 3:
        raise DatasetError(f"{path}: X has shape {ds.X.shape}, feature vectors (N, F); "
                           "replay needs windows of samples (N, channels, T)")
    X = np.concatenate([ds.X, ds.X_test]).astype(np.float32, copy=False)
    y = np.concatenate([ds.y, ds.y_test])
    if X.shape[1] > MAX_CHANNELS:
        raise DatasetError(f"{path}: X has {X.shape[1]} channels (axis 1); a frame carries "
                           f"at most {MAX_CHANNELS}")
    return X, y, ds.classes, ds.sample_rate_hz


class Replay(EngineDriven):
    """One device streaming a dataset; see the module docstring. A replay runs once."""

    def __init__(self, data: str | Path, broker_url: str, *, device: str,
                 rate_hz: float | None = None, frame_samples: int = 16, labels: float = 0.1,
                 label_delay_s: float = 5.0, loop: bool = False, speed: float = 1.0,
                 seed: int = 0, prefix: str = DEFAULT_PREFIX, protocol: str = "5",
                 encoding: str = "binary", start_ts: float | None = None,
                 duration_s: float | None = None, connect_timeout_s: float = 5.0,
                 on_frame: FrameCallback | None = None, on_label: LabelCallback | None = None):
        self.X, self.y, self.classes, file_rate = load_windows(data)
        rate = file_rate if rate_hz is None else rate_hz
        if rate is None:
            raise ConfigError(f"{data}: the dataset has no sample_rate_hz: give the rate "
                              "(--rate HZ)")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < 1e6:
            raise ConfigError(f"Invalid rate_hz: {rate!r} (expected a sample rate in Hz > 0)")
        if isinstance(frame_samples, bool) or not isinstance(frame_samples, int) or not (
                1 <= frame_samples <= MAX_SAMPLES):
            raise ConfigError(f"Invalid frame_samples: {frame_samples!r} "
                              f"(expected 1..{MAX_SAMPLES})")
        if not 0 <= labels <= 1:
            raise ConfigError(f"Invalid labels: {labels!r} (expected a fraction in [0, 1])")
        if not label_delay_s >= 0:
            raise ConfigError(f"Invalid label_delay_s: {label_delay_s!r} (expected seconds >= 0)")
        if encoding not in ENCODERS:
            raise ConfigError(f"Invalid encoding: {encoding!r} "
                              f"(expected one of {sorted(ENCODERS)})")
        try:
            self.topics = Topics(device, prefix)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        n, _, t = self.X.shape
        if not loop and n * t < frame_samples:
            raise ConfigError(f"{data}: {n} window(s) of {t} samples make less than one frame "
                              f"of frame_samples={frame_samples}")
        self.device, self.rate_hz, self.frame_samples = device, float(rate), frame_samples
        self.loop, self.seed, self.start_ts = loop, seed, start_ts
        self.window_s = t / self.rate_hz
        self.on_frame, self.on_label = on_frame, on_label
        self.n_frames = None if loop else n * t // frame_samples
        self._encode = ENCODERS[encoding]
        self._oracle = Oracle(LabelOracle(fraction=labels, delay_s=label_delay_s,
                                          min_segment_s=0.0), np.random.SeedSequence([seed, 7]))
        self._lock = threading.Lock()
        self._stream = np.zeros((0, self.X.shape[1]), np.float32)  # samples not yet sent
        self._stream_first = 0  # sample index of _stream[0]
        self._laid_out = 0  # samples laid out so far (all passes)
        self._passes = 0
        self._seg_starts: list[int] = []  # segments (runs of one class), in samples
        self._seg_ends: list[int] = []
        self._seg_classes: list[str] = []
        self._closed = 0  # segments handed to the oracle
        self._labels: list = []  # heap of (due stream s, n, payload)
        self.labels_sent = 0
        self._t0: float | None = None
        end = None if duration_s is None else duration_s * speed
        self.engine = Engine(broker_url, (device,), self._produce, rate_hz=self.rate_hz,
                             frame_samples=frame_samples, speed=speed,
                             stream_end_s=end, max_frames=self.n_frames, finish=self._finish,
                             protocol=protocol, connect_timeout_s=connect_timeout_s,
                             name="reverie-replay")

    # --- the stream ------------------------------------------------------------

    def _lay_out(self) -> None:
        """Append the next pass over the dataset to the stream."""
        n, c, t = self.X.shape
        order = np.random.default_rng([self.seed, self._passes]).permutation(n)
        self._passes += 1
        samples = self.X[order].transpose(0, 2, 1).reshape(n * t, c)  # (N*T, C)
        with self._lock:
            for j, w in enumerate(order):
                cls, start = self.classes[self.y[w]], self._laid_out + j * t
                if self._seg_classes and self._seg_classes[-1] == cls:
                    self._seg_ends[-1] = start + t
                else:
                    self._seg_starts.append(start)
                    self._seg_ends.append(start + t)
                    self._seg_classes.append(cls)
        self._stream = np.concatenate([self._stream, samples])
        self._laid_out += n * t

    def truth_at(self, sample_index: int) -> str:
        """The class of sample `sample_index` (from 0) of the stream laid out so far."""
        with self._lock:
            if not 0 <= sample_index < self._laid_out:
                raise ValueError(f"No ground truth for sample {sample_index} "
                                 f"(expected 0..{self._laid_out - 1})")
            return self._seg_classes[bisect.bisect_right(self._seg_starts, sample_index) - 1]

    def truth(self, seq: int) -> str:
        """The class of frame `seq` (of its first sample)."""
        return self.truth_at(seq * self.frame_samples)

    # --- running: EngineDriven (run, start, stop, join, dry_run) ----------------

    def _produce(self, i: int, k: int, t_s: float, out: list) -> None:
        if self._t0 is None:
            self._t0 = time.time() if self.start_ts is None else self.start_ts
        fs = self.frame_samples
        first, end = k * fs, (k + 1) * fs
        # One sample beyond the frame when looping: a class run that reaches the end of a
        # pass may go on in the next one, so it is not closed before that is known.
        while self._laid_out < end + (1 if self.loop else 0):
            if not self.loop and self._passes:
                break
            self._lay_out()
        j = first - self._stream_first
        values = self._stream[j:j + fs]  # (S, C)
        if j > 1 << 16:  # forget what was sent, now and then
            self._stream, self._stream_first = self._stream[j + fs:].copy(), end
        ts = self._t0 + first / self.rate_hz
        out.append((self.topics.frames, self._encode(k, ts, values), 0, 0))
        if self.on_frame is not None:
            self.on_frame(self.device, k, ts, values, self.truth_at(first))
        last = end == self.n_frames * fs if self.n_frames is not None else False
        self._close_segments(end, last)
        self._due(t_s, out)

    def _close_segments(self, sent: int, last: bool) -> None:
        """Hand the segments the stream has passed (all, after the last frame) to the oracle."""
        while self._closed < len(self._seg_starts):
            i = self._closed
            seg_end = min(self._seg_ends[i], sent)
            if self._seg_ends[i] > sent and not last:
                return
            self._closed += 1
            if seg_end <= self._seg_starts[i]:
                continue  # in the dropped tail
            start_ts = self._t0 + self._seg_starts[i] / self.rate_hz
            end_ts = self._t0 + seg_end / self.rate_hz
            # the windows wholly inside the run: exactly the dataset's windows when the
            # agent's windows line up with them (same length, the stream from sample 0)
            quarter = 0.25 / self.rate_hz
            span = (start_ts - quarter, end_ts - self.window_s + quarter)
            label = self._oracle.segment(self.device, self._seg_classes[i], start_ts,
                                                  end_ts, self.classes)
            if label:
                payload = dict(label["payload"])
                payload["from_ts"], payload["to_ts"] = span
                heapq.heappush(self._labels, (label["due_s"] - self._t0, i, payload))

    def _due(self, t_s: float, out: list) -> None:
        while self._labels and self._labels[0][0] <= t_s:
            _, _, payload = heapq.heappop(self._labels)
            out.append((self.topics.labels, json.dumps(payload, separators=(",", ":")).encode(),
                        1, -1))
            self.labels_sent += 1
            if self.on_label is not None:
                self.on_label(self.device, payload)

    def _finish(self, t_s: float, out: list) -> float | None:
        self._due(t_s, out)
        return self._labels[0][0] if self._labels else None
