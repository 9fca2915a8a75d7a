"""Seeded synthetic IMU-like signals: 6 channels at 50 Hz, one parametrized generator per class.

Every class is a periodic motion: a fundamental frequency with a few harmonics, a per-channel
amplitude and phase lag, a gravity vector (the accelerometer reading at rest, i.e. the device
orientation) and white noise. Units: accelerometer ``ax, ay, az`` in g, gyroscope
``gx, gy, gz`` in rad/s.

Each *bout* of a class (a stretch of the stream, or one dataset window) draws its own
variation: frequency +-10 %, a common intensity factor (log-normal, sigma 0.2) and ~10 % per
channel on the amplitudes, gravity tilted by up to 8 degrees, noise level +-25 %, and (for
dataset windows) a random phase. So windows are not copies of one template: walk and stairs
overlap a little, yet a small 1D CNN, or even nearest-class-mean on spectra, separates the
classes (~98 %).

The physics are deliberately crude (no rotation of gravity with the motion, abrupt class
changes); `firmware_sim.sensors` has the physics-based models (an IMU with rotating gravity
and falls, machine vibration, room climate). This generator stays as it is: the simulator's
default stream and the test bundles trained on it depend on its exact statistics.

>>> gen = SignalGenerator(seed=1)
>>> gen.samples("walk", 16).shape      # the next 16 samples of one device's stream
(16, 6)
>>> X, y, classes = make_dataset(4, window=128, seed=0)
>>> X.shape, y.shape, len(classes)
((24, 6, 128), (24,), 6)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.dataset import save_dataset

CHANNELS = ("ax", "ay", "az", "gx", "gy", "gz")
SAMPLE_RATE_HZ = 50.0

F0_JITTER = 0.10  # relative, uniform
INTENSITY_JITTER = 0.20  # log-normal sigma of a common amplitude factor (how vigorous)
AMP_JITTER = 0.10  # relative, normal, per channel
TILT_JITTER_RAD = math.radians(8.0)
NOISE_JITTER = 0.25  # relative, uniform


@dataclass(frozen=True)
class ClassProfile:
    """The generator of one class; per-channel tuples are in ``CHANNELS`` order."""

    name: str
    f0_hz: float
    harmonics: tuple[float, ...]  # relative amplitude of f0, 2*f0, 3*f0, ...
    amplitude: tuple[float, ...]  # (6,) peak of the fundamental, g or rad/s
    lag_rad: tuple[float, ...]  # (6,) phase lag of each channel behind the fundamental
    gravity: tuple[float, float, float]  # accelerometer reading at rest, g (unit length)
    noise: float  # white-noise std, g or rad/s


def _g(pitch_deg: float, roll_deg: float) -> tuple[float, float, float]:
    """Gravity as read by a device pitched (about x) and rolled (about y) from flat."""
    p, r = math.radians(pitch_deg), math.radians(roll_deg)
    return (math.sin(r) * math.cos(p), -math.sin(p), math.cos(r) * math.cos(p))


_Q = math.pi / 2
PROFILES: dict[str, ClassProfile] = {p.name: p for p in (
    # Resting on a table: breathing-rate sway, almost only noise.
    ClassProfile("idle", 0.25, (1.0,), (0.01, 0.01, 0.01, 0.02, 0.02, 0.01),
                 (0, _Q, 0, _Q, 0, 0), _g(0, 0), 0.01),
    # Heel strikes load az; the torso rocks about x and y at the step rate.
    ClassProfile("walk", 1.8, (1.0, 0.45, 0.15), (0.12, 0.08, 0.30, 0.60, 0.30, 0.20),
                 (_Q, 0, 0, _Q, _Q, 0), _g(5, 0), 0.03),
    # Faster and harder than walking, with a sharp (harmonic-rich) impact.
    ClassProfile("run", 2.8, (1.0, 0.6, 0.3), (0.35, 0.25, 1.10, 1.60, 0.80, 0.60),
                 (_Q, 0, 0, _Q, _Q, 0), _g(10, 0), 0.06),
    # Slower cadence, leaning forward, strong second harmonic from the lift-then-step.
    ClassProfile("stairs", 1.55, (1.0, 0.75, 0.3), (0.16, 0.08, 0.36, 0.75, 0.25, 0.18),
                 (_Q, 0, 0, _Q, _Q, 0), _g(12, 0), 0.04),
    # Shaken by hand side to side: fast, large, mostly ay and a twist about z.
    ClassProfile("shake", 5.0, (1.0, 0.3), (0.30, 1.20, 0.15, 0.40, 0.30, 3.00),
                 (0, 0, _Q, _Q, 0, _Q), _g(0, 0), 0.08),
    # Lying on its side and rocking slowly.
    ClassProfile("tilt", 0.6, (1.0, 0.2), (0.05, 0.03, 0.05, 0.05, 0.30, 0.05),
                 (0, _Q, _Q, 0, _Q, 0), _g(0, 70), 0.02),
)}
CLASSES = tuple(PROFILES)


def _profile(cls: str) -> ClassProfile:
    try:
        return PROFILES[cls]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown signal class: {cls!r} (expected one of {CLASSES})") from None


class SignalGenerator:
    """One device's sensor stream, deterministic under `seed`.

    `samples` continues the stream: the phase of the motion is carried over between calls
    (also across a class change), and a new bout (fresh jitter) starts whenever the class
    differs from the previous call's. `window` draws an independent window instead.
    """

    def __init__(self, seed: int | np.random.SeedSequence = 0):
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._phase = 0.0  # radians of the fundamental at the next sample
        self._t_s = 0.0  # time of the next sample
        self._cls: str | None = None
        self._f_hz = 0.0
        self._amp = np.zeros(6)  # (6,)
        self._offset = np.zeros(6)  # (6,) gravity on the accelerometer, 0 on the gyroscope
        self._noise = 0.0

    @property
    def t_s(self) -> float:
        """Time, in seconds of stream time, of the next sample `samples` returns."""
        return self._t_s

    def _start_bout(self, cls: str) -> None:
        p, rng = _profile(cls), self._rng
        self._cls = cls
        self._f_hz = p.f0_hz * (1 + rng.uniform(-F0_JITTER, F0_JITTER))
        intensity = math.exp(INTENSITY_JITTER * rng.standard_normal())
        self._amp = (np.asarray(p.amplitude) * intensity
                     * np.abs(1 + AMP_JITTER * rng.standard_normal(6)))
        # Tilt gravity about a random horizontal axis (Rodrigues for a vector orthogonal to it).
        g = np.asarray(p.gravity)
        axis = np.cross(g, rng.standard_normal(3))
        axis /= np.linalg.norm(axis)
        angle = rng.uniform(0, TILT_JITTER_RAD)
        self._offset = np.zeros(6)
        self._offset[:3] = g * math.cos(angle) + np.cross(axis, g) * math.sin(angle)
        self._noise = p.noise * (1 + rng.uniform(-NOISE_JITTER, NOISE_JITTER))

    def _render(self, n: int) -> np.ndarray:
        p = PROFILES[self._cls]
        t = np.arange(n) / SAMPLE_RATE_HZ  # (n,)
        phase = self._phase + 2 * math.pi * self._f_hz * t  # (n,)
        theta = phase[:, None] - np.asarray(p.lag_rad)[None, :]  # (n, 6)
        wave = sum(h * np.sin(k * theta) for k, h in enumerate(p.harmonics, start=1))
        out = self._offset + self._amp * wave + self._noise * self._rng.standard_normal((n, 6))
        self._phase = (self._phase + 2 * math.pi * self._f_hz * n / SAMPLE_RATE_HZ) % (2 * math.pi)
        self._t_s += n / SAMPLE_RATE_HZ
        return out.astype(np.float32)  # (n, 6)

    def samples(self, cls: str, n: int, *, t0: float | None = None) -> np.ndarray:
        """The next `n` samples of class `cls`, float32 ``(n, 6)``.

        `t0` is the stream time of the first sample; by default the stream continues where
        the previous call ended. A different `t0` jumps there, advancing the phase as if the
        motion had gone on (a gap, e.g. dropped frames), so the stream stays continuous.
        """
        if n < 0:
            raise ValueError(f"Invalid sample count: n={n} (expected >= 0)")
        if cls != self._cls:
            self._start_bout(cls)
        if t0 is not None:
            gap = 2 * math.pi * self._f_hz * (t0 - self._t_s)
            self._phase = (self._phase + gap) % (2 * math.pi)
            self._t_s = float(t0)
        return self._render(n)

    def window(self, cls: str, n: int) -> np.ndarray:
        """An independent window of `n` samples: a fresh bout at a random phase, ``(n, 6)``.

        It does not continue the stream: the next `samples` call starts a new bout.
        """
        self._start_bout(cls)
        self._phase = self._rng.uniform(0, 2 * math.pi)
        out = self._render(n)
        self._cls = None
        return out


def make_dataset(n_per_class: int, window: int = 128, classes=None, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Independent windows of each class, shuffled: ``(X (N, 6, window) float32,
    y (N,) int64 indices into classes, classes)``, ``N = n_per_class * len(classes)``.

    `classes` picks a subset (in the given order; default `CLASSES`), e.g. to train a base
    model on some classes and stream the others later.
    """
    classes = CLASSES if classes is None else tuple(classes)
    for c in classes:
        _profile(c)
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"Invalid classes: {classes!r} (expected distinct names from {CLASSES})")
    if n_per_class < 1 or window < 1:
        raise ValueError(f"Invalid size: n_per_class={n_per_class}, window={window} (expected >= 1)")
    gen = SignalGenerator(seed)
    X = np.empty((n_per_class * len(classes), len(CHANNELS), window), np.float32)  # (N, C, T)
    y = np.repeat(np.arange(len(classes), dtype=np.int64), n_per_class)
    for i, k in enumerate(y):
        X[i] = gen.window(classes[k], window).T
    order = np.random.default_rng(seed).permutation(len(y))
    return X[order], y[order], classes


def write_dataset(path: str | Path, n_per_class: int = 200, window: int = 128, classes=None,
                  seed: int = 0) -> Path:
    """`make_dataset` written in the NPZ dataset format (agent.dataset); returns the path."""
    X, y, names = make_dataset(n_per_class, window, classes, seed)
    return save_dataset(path, X, y, classes=names, channels=CHANNELS,
                        sample_rate_hz=SAMPLE_RATE_HZ)
