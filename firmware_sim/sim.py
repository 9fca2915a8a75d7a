"""Simulated devices of the original IMU-like signal (`firmware_sim.signals`), with truth.

Each device is a `DeviceStream`: its own seeded `SignalGenerator` and a schedule of random
class segments (whole frames, so every frame has one class). A `Simulator` drives any number
of them through the engine (`firmware_sim.engine`: one pacing loop, one paho client, devices
staggered within a frame period, absolute deadlines, lag and rate accounting in `SimStats`).
Scenarios with the newer sensor models, impairments, labels and sleeps run in
`firmware_sim.runner.ScenarioRunner`; this class stays as the plain "N devices switching
between activities" simulator (``reverie sim`` without ``--scenario``, the tests' streams).

Frames go to ``{prefix}/{device}/frames`` with QoS 0, ``seq`` counting from 0 per device
and ``ts`` the stream time of the frame's first sample (``start_ts + first_sample / rate``;
at ``speed=1`` that is close to the wall clock). Everything a device sends is a function of
``seed`` and its index, not of timing.

>>> sim = Simulator("mqtt://127.0.0.1:1883", devices=2, duration_s=5, speed=4)  # doctest: +SKIP
>>> stats = sim.run()                                                           # doctest: +SKIP
>>> sim.truth("sim-001", 3)                                                     # doctest: +SKIP
'walk'
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from agent.errors import ConfigError
from agent.mqtt import BrokerURL
from agent.protocol import MAX_SAMPLES, encode_frame_binary, encode_frame_json
from agent.topics import DEFAULT_PREFIX, Topics
from firmware_sim.engine import (
    PROTOCOLS,
    Engine,
    EngineDriven,
    SimStats,
    check_protocol,
    check_speed,
)
from firmware_sim.signals import CLASSES, SAMPLE_RATE_HZ, SignalGenerator

ENCODERS = {"json": encode_frame_json, "binary": encode_frame_binary}
__all__ = ["ENCODERS", "PROTOCOLS", "DeviceStream", "FrameCallback", "SimStats", "Simulator",
           "check_speed"]

# on_frame(device, seq, ts, values (S, 6) float32, class name), called as each frame is sent.
FrameCallback = Callable[[str, int, float, np.ndarray, str], None]


class DeviceStream:
    """One simulated device: its signal, its class schedule and the ground truth.

    Segments last a uniform ``segment_s`` seconds rounded to whole frames; consecutive
    segments differ in class (when there is more than one). Thread-safe: the truth can be
    read while another thread generates frames.
    """

    def __init__(self, device: str, *, seed: int | np.random.SeedSequence = 0,
                 classes: Sequence[str] = CLASSES, segment_s: tuple[float, float] = (5.0, 20.0),
                 frame_samples: int = 16):
        self.device = device
        self.classes = tuple(classes)
        self.segment_s = segment_s
        self.frame_samples = frame_samples
        root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        signal_seed, schedule_seed = root.spawn(2)
        self._gen = SignalGenerator(signal_seed)
        self._rng = np.random.default_rng(schedule_seed)
        self._lock = threading.Lock()
        self._seg_starts: list[int] = []  # first sample of each segment
        self._seg_classes: list[str] = []
        self._seg_end = 0  # one past the last sample of the last segment
        self._seq = 0  # the next frame's seq


    def _add_segment(self) -> None:
        lo, hi = self.segment_s
        n_frames = max(1, round(self._rng.uniform(lo, hi) * SAMPLE_RATE_HZ / self.frame_samples))
        choices = [c for c in self.classes if not self._seg_classes or c != self._seg_classes[-1]]
        cls = choices[self._rng.integers(len(choices))] if choices else self.classes[0]
        with self._lock:
            self._seg_starts.append(self._seg_end)
            self._seg_classes.append(cls)
            self._seg_end += n_frames * self.frame_samples

    def next_frame(self) -> tuple[int, int, np.ndarray, str]:
        """Generate the next frame: ``(seq, first_sample, values (S, 6) float32, class)``."""
        first = self._seq * self.frame_samples
        while first >= self._seg_end:
            self._add_segment()
        cls = self._seg_classes[-1]
        values = self._gen.samples(cls, self.frame_samples)
        with self._lock:
            seq, self._seq = self._seq, self._seq + 1
        return seq, first, values, cls

    def truth_at(self, sample_index: int) -> str:
        """The class of sample `sample_index` (counting from 0) of a generated frame."""
        with self._lock:
            n = self._seq * self.frame_samples
            if not 0 <= sample_index < n:
                raise ValueError(f"No ground truth for {self.device} sample {sample_index} "
                                 f"(expected 0..{n - 1}: samples generated so far)")
            return self._seg_classes[bisect.bisect_right(self._seg_starts, sample_index) - 1]

    def truth(self, seq: int) -> str:
        """The class of frame `seq` (a frame never spans two segments)."""
        return self.truth_at(seq * self.frame_samples)

    def segments(self) -> list[tuple[int, int, str]]:
        """``(first_sample, end_sample, class)`` of every segment begun so far."""
        with self._lock:
            ends = self._seg_starts[1:] + [self._seg_end]
            return list(zip(self._seg_starts, ends, self._seg_classes, strict=True))


class Simulator(EngineDriven):
    """N simulated devices publishing frames in (scaled) real time; see the module docstring.

    `devices` is a count (ids ``sim-000``, ``sim-001``, ...) or a list of ids. `duration_s`
    is wall-clock time (``None``: until `stop`); at ``speed=k`` that covers ``k *
    duration_s`` seconds of stream time. `run` blocks; `start` / `stop` / `join` run it in a
    background thread. Both connect first and raise BrokerError if the broker does not
    accept the connection within `connect_timeout_s`.
    """

    def __init__(self, broker_url: str, devices: int | Sequence[str] = 1,
                 duration_s: float | None = 10.0, *, prefix: str = DEFAULT_PREFIX,
                 frame_samples: int = 16, speed: float = 1.0, encoding: str = "json",
                 seed: int = 0, classes: Sequence[str] | None = None,
                 segment_s: tuple[float, float] = (5.0, 20.0), protocol: str = "5",
                 connect_timeout_s: float = 5.0, start_ts: float | None = None,
                 on_frame: FrameCallback | None = None):
        BrokerURL.parse(broker_url)  # a bad URL fails here, not at the start
        if isinstance(devices, str):  # one id, not a sequence of one-letter ids
            devices = [devices]
        names = [f"sim-{i:03d}" for i in range(devices)] if isinstance(devices, int) else list(devices)
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"Invalid devices: {devices!r} (expected a count >= 1 or distinct ids)")
        try:
            self._topics = [Topics(d, prefix).frames for d in names]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        classes = CLASSES if classes is None else tuple(classes)
        unknown = [c for c in classes if c not in CLASSES]
        if not classes or unknown:
            raise ConfigError(f"Invalid classes: {unknown or classes!r} (expected names from {CLASSES})")
        if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
            raise ConfigError(f"Invalid duration_s: {duration_s!r} (expected > 0 or None)")
        check_speed(speed)
        if not 1 <= frame_samples <= MAX_SAMPLES:
            raise ConfigError(f"Invalid frame_samples: {frame_samples!r} (expected 1..{MAX_SAMPLES})")
        if encoding not in ENCODERS:
            raise ConfigError(f"Invalid encoding: {encoding!r} (expected one of {sorted(ENCODERS)})")
        check_protocol(protocol)
        lo, hi = segment_s
        if not 0 < lo <= hi:
            raise ConfigError(f"Invalid segment_s: {segment_s!r} (expected (min, max), 0 < min <= max)")
        self.devices = tuple(names)
        self.duration_s = duration_s
        self.prefix = prefix
        self.frame_samples = frame_samples
        self.speed = speed
        self.encoding = encoding
        self.seed = seed
        self.classes = classes
        self.protocol = protocol
        self.start_ts = start_ts
        self.on_frame = on_frame
        seeds = np.random.SeedSequence(seed).spawn(len(names))
        self._streams = [DeviceStream(d, seed=s, classes=classes, segment_s=(lo, hi),
                                      frame_samples=frame_samples)
                         for d, s in zip(names, seeds, strict=True)]
        self._by_name = dict(zip(names, self._streams, strict=True))
        self._encode = ENCODERS[encoding]
        self._t0: float | None = None  # the stream's epoch (start_ts or the first frame's time)
        self.engine = Engine(broker_url, names, self._produce, rate_hz=SAMPLE_RATE_HZ,
                             frame_samples=frame_samples, speed=speed,
                             stream_end_s=None if duration_s is None else duration_s * speed,
                             protocol=protocol, connect_timeout_s=connect_timeout_s)
        self.broker = self.engine.broker

    # --- ground truth --------------------------------------------------------

    def stream(self, device: str) -> DeviceStream:
        try:
            return self._by_name[device]
        except KeyError:
            raise ValueError(f"Unknown device: {device!r} (simulating {list(self.devices)})") from None

    def truth(self, device: str, seq: int) -> str:
        """The class of frame `seq` of `device`."""
        return self.stream(device).truth(seq)

    def truth_at(self, device: str, sample_index: int) -> str:
        """The class of sample `sample_index` (from 0) of `device`."""
        return self.stream(device).truth_at(sample_index)

    # --- running: EngineDriven (run, start, stop, join, dry_run) ----------------

    def _produce(self, i: int, k: int, t_s: float, out: list) -> None:
        if self._t0 is None:
            self._t0 = time.time() if self.start_ts is None else self.start_ts
        seq, first, values, cls = self._streams[i].next_frame()
        ts = self._t0 + first / SAMPLE_RATE_HZ
        out.append((self._topics[i], self._encode(seq, ts, values), 0, i))
        if self.on_frame is not None:
            self.on_frame(self.devices[i], seq, ts, values, cls)
