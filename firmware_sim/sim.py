"""Simulated devices publishing sensor frames over MQTT, with recorded ground truth.

Each device is a `DeviceStream`: its own seeded `SignalGenerator` and a schedule of random
class segments (whole frames, so every frame has one class). A `Simulator` drives any number
of them from one scheduler loop and one paho client: frame ``seq`` of a device is due
``(seq + 1) * frame_samples / (SAMPLE_RATE_HZ * speed)`` seconds after the start (a real
sensor publishes a frame once its last sample is taken), devices staggered evenly within a
frame period so the broker sees a steady flow. A loop that falls behind publishes the late
frames at once and reports the lag (``SimStats.max_lag_s``).

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
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from agent.errors import BrokerError, ConfigError
from agent.mqtt import BrokerURL, make_client
from agent.protocol import MAX_SAMPLES, encode_frame_binary, encode_frame_json
from agent.topics import DEFAULT_PREFIX, Topics
from firmware_sim.signals import CLASSES, SAMPLE_RATE_HZ, SignalGenerator

ENCODERS = {"json": encode_frame_json, "binary": encode_frame_binary}
PROTOCOLS = ("5", "3.1.1")

# on_frame(device, seq, ts, values (S, 6) float32, class name), called after each publish.
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


@dataclass(frozen=True)
class SimStats:
    frames_sent: dict[str, int]  # per device, accepted by the client
    frames_dropped: int  # publish refused (e.g. not connected); their seq is skipped
    bytes_sent: int
    elapsed_s: float  # start to the last publish
    sample_rate_hz: float  # achieved, mean per device (0 with fewer than 2 frames)
    target_sample_rate_hz: float  # SAMPLE_RATE_HZ * speed
    max_lag_s: float  # worst delay of a publish behind its due time


class Simulator:
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
        self.broker = BrokerURL.parse(broker_url)
        if isinstance(devices, str):  # one id, not a sequence of one-letter ids
            devices = [devices]
        names = [f"sim-{i:03d}" for i in range(devices)] if isinstance(devices, int) else list(devices)
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"Invalid devices: {devices!r} (expected a count >= 1 or distinct ids)")
        try:
            self._topics = {d: Topics(d, prefix).frames for d in names}
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        classes = CLASSES if classes is None else tuple(classes)
        unknown = [c for c in classes if c not in CLASSES]
        if not classes or unknown:
            raise ConfigError(f"Invalid classes: {unknown or classes!r} (expected names from {CLASSES})")
        if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
            raise ConfigError(f"Invalid duration_s: {duration_s!r} (expected > 0 or None)")
        if not (math.isfinite(speed) and speed > 0):
            raise ConfigError(f"Invalid speed: {speed!r} (expected a finite number > 0)")
        if not 1 <= frame_samples <= MAX_SAMPLES:
            raise ConfigError(f"Invalid frame_samples: {frame_samples!r} (expected 1..{MAX_SAMPLES})")
        if encoding not in ENCODERS:
            raise ConfigError(f"Invalid encoding: {encoding!r} (expected one of {sorted(ENCODERS)})")
        if protocol not in PROTOCOLS:
            raise ConfigError(f"Invalid MQTT protocol: {protocol!r} (expected one of {PROTOCOLS})")
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
        self.connect_timeout_s = connect_timeout_s
        self.start_ts = start_ts
        self.on_frame = on_frame
        seeds = np.random.SeedSequence(seed).spawn(len(names))
        self._streams = {d: DeviceStream(d, seed=s, classes=classes, segment_s=(lo, hi),
                                         frame_samples=frame_samples)
                         for d, s in zip(names, seeds, strict=True)}
        self._stop = threading.Event()
        self._done = threading.Event()  # set when the background run has finished
        self._client = None
        self._thread: threading.Thread | None = None
        self._stats: SimStats | None = None
        self._error: BaseException | None = None

    # --- ground truth --------------------------------------------------------

    def stream(self, device: str) -> DeviceStream:
        try:
            return self._streams[device]
        except KeyError:
            raise ValueError(f"Unknown device: {device!r} (simulating {list(self.devices)})") from None

    def truth(self, device: str, seq: int) -> str:
        """The class of frame `seq` of `device`."""
        return self.stream(device).truth(seq)

    def truth_at(self, device: str, sample_index: int) -> str:
        """The class of sample `sample_index` (from 0) of `device`."""
        return self.stream(device).truth_at(sample_index)

    # --- running -------------------------------------------------------------

    def run(self) -> SimStats:
        """Connect, publish until `duration_s` has passed or `stop` is called, disconnect."""
        self._connect()
        try:
            return self._publish_loop()
        finally:
            self._disconnect()

    def start(self) -> None:
        """Connect (raising BrokerError here), then publish in a background thread."""
        self._connect()
        self._thread = threading.Thread(target=self._run_thread, name="reverie-sim", daemon=True)
        self._thread.start()

    def _run_thread(self) -> None:
        try:
            self._stats = self._publish_loop()
        except BaseException as exc:  # handed to join()
            self._error = exc
        finally:
            self._disconnect()
            self._done.set()

    def stop(self) -> None:
        """Ask the loop to finish; safe from any thread and before the start."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> SimStats | None:
        """Wait for the background run; its stats, or None if still running after `timeout`.

        An exception raised in the background thread is raised here.
        """
        if self._thread is None:
            raise RuntimeError("Simulator.join() called before start()")
        # Wait on an Event, not Thread.join: a Ctrl-C inside Thread.join(timeout) can leave
        # the thread marked as finished while it still runs (CPython 3.11).
        if not self._done.wait(timeout):
            return None
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._stats

    def _connect(self) -> None:
        if self._client is not None:
            raise RuntimeError("A Simulator runs once; create a new one")
        client = make_client(self.broker, client_id=f"reverie-sim-{uuid.uuid4().hex[:8]}",
                             protocol=self.protocol)
        self._client = client
        connack = threading.Event()
        result = []

        def on_connect(client, userdata, flags, reason_code, properties):
            result.append(reason_code)
            connack.set()

        client.on_connect = on_connect
        try:
            client.connect(self.broker.host, self.broker.port, keepalive=30)
        except OSError as exc:
            raise BrokerError(f"Cannot connect to MQTT broker {self.broker}: {exc}") from None
        client.loop_start()
        if not connack.wait(self.connect_timeout_s):
            self._disconnect()
            raise BrokerError(f"No CONNACK from MQTT broker {self.broker} "
                              f"within {self.connect_timeout_s} s")
        if result[0].is_failure:
            self._disconnect()
            raise BrokerError(f"MQTT broker {self.broker} refused the connection: {result[0]}")

    def _disconnect(self) -> None:
        client = self._client
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def _publish_loop(self) -> SimStats:
        encode = ENCODERS[self.encoding]
        period_s = self.frame_samples / (SAMPLE_RATE_HZ * self.speed)  # wall time per frame
        n = len(self.devices)
        sent = dict.fromkeys(self.devices, 0)
        t_first: dict[str, float] = {}  # first and last accepted publish per device
        t_last_by: dict[str, float] = {}
        dropped = n_bytes = 0
        max_lag_s = 0.0
        last_info = None
        start_ts = time.time() if self.start_ts is None else self.start_ts
        t_start = t_last = time.monotonic()
        k = 0
        while not self._stop.is_set():
            for i, device in enumerate(self.devices):
                due = (k + 1 + i / n) * period_s
                if self.duration_s is not None and due > self.duration_s:
                    self._stop.set()
                delay = t_start + due - time.monotonic()
                if self._stop.is_set() or (delay > 0 and self._stop.wait(delay)):
                    break
                max_lag_s = max(max_lag_s, -delay)
                seq, first, values, cls = self._streams[device].next_frame()
                ts = start_ts + first / SAMPLE_RATE_HZ
                payload = encode(seq, ts, values)
                info = self._client.publish(self._topics[device], payload, qos=0)
                t_last = time.monotonic()
                if info.rc == 0:
                    sent[device] += 1
                    t_first.setdefault(device, t_last)
                    t_last_by[device] = t_last
                    n_bytes += len(payload)
                    last_info = info
                else:
                    dropped += 1
                if self.on_frame is not None:
                    self.on_frame(device, seq, ts, values, cls)
            k += 1
        if last_info is not None:
            # QoS 0 has no acknowledgement; this waits until paho wrote the last frame out.
            try:
                last_info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass
        # The rate between each device's first and last frame: free of the start-up period
        # and of the stagger between devices.
        rates = [(sent[d] - 1) * self.frame_samples / (t_last_by[d] - t_first[d])
                 for d in self.devices if sent[d] > 1 and t_last_by[d] > t_first[d]]
        rate = sum(rates) / len(rates) if rates else 0.0
        return SimStats(sent, dropped, n_bytes, t_last - t_start, rate,
                        SAMPLE_RATE_HZ * self.speed, max_lag_s)
