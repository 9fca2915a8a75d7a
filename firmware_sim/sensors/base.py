"""The sensor-model interface: a model makes *bouts*, a `Source` strings bouts into a stream.

A `SensorModel` describes one kind of sensor (channels, units, sample rate) and the classes
it can generate. Each class is a seeded, parametrized generator: starting a *bout* of a
class draws that bout's variation (frequency, intensity, orientation, fault severity, ...)
from an rng, and the bout then renders samples as a function of its sample index. Two uses:

* `SensorModel.window(cls, n, rng)`: one independent bout, e.g. a dataset window;
  transient classes (a fall, a door opening) place their event inside the window.
* `SensorModel.source(cls, seed)`: one device's continuous stream. `Source.read(n)` returns
  the next samples; `Source.set_class(cls)` starts a new bout, which inherits the device's
  state (sensor bias, orientation, room climate) from the previous bout, and for
  ``model.crossfade_s`` seconds the two bouts' outputs are blended so a class change never
  jumps.

Bouts are *chunk-invariant*: a bout's deterministic part is a function of the absolute
sample index (never of an accumulated phase), its noise comes from its own rng drawn in
sample order, and random events (bearing impacts) from another rng drawn in event order. So
``read(n); read(m)`` returns exactly what one ``read(n + m)`` returns.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from agent.errors import ConfigError

Seed = int | np.random.SeedSequence


def smoothstep(u: np.ndarray) -> np.ndarray:
    """0 before 0, 1 after 1, a C1 ramp in between (3u^2 - 2u^3)."""
    u = np.clip(u, 0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


def smoothstep_slope(u: np.ndarray) -> np.ndarray:
    """d smoothstep / du."""
    inside = (u > 0.0) & (u < 1.0)
    return np.where(inside, 6.0 * u * (1.0 - u), 0.0)


def child_rng(rng: np.random.Generator) -> np.random.Generator:
    """An independent generator seeded from `rng` (one draw), e.g. a bout's noise stream."""
    return np.random.default_rng(int(rng.integers(2**63)))


class Bout(ABC):
    """One stretch of one class. `render` continues from the previous call."""

    cls: str

    def __init__(self, cls: str, start_index: int):
        self.cls = cls
        self.start_index = start_index  # the source's sample index of this bout's first sample
        self.index = start_index  # the source's sample index of the next sample

    def render(self, n: int) -> np.ndarray:
        """The next `n` samples, float64 ``(n, C)``."""
        out = self._render(self.index, n)
        self.index += n
        return out

    @abstractmethod
    def _render(self, i0: int, n: int) -> np.ndarray:
        """Samples ``i0 .. i0 + n - 1`` (source indices), float64 ``(n, C)``; called in order."""


class SensorModel(ABC):
    """A kind of sensor and the classes it generates. Subclasses set the class attributes
    and implement `_bout`; `__init__` keyword arguments are the model's parameters."""

    name: str = ""
    channels: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    rate_hz: float = 0.0
    classes: tuple[str, ...] = ()
    crossfade_s: float = 0.0  # blend of the old and the new bout after `Source.set_class`

    @property
    def params(self) -> dict[str, object]:
        """The model's parameters, as `get_model` accepts them."""
        names = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in names if k != "self"}

    def check_class(self, cls: str) -> str:
        if not isinstance(cls, str) or cls not in self.classes:
            raise ConfigError(f"Unknown class {cls!r} for sensor model {self.name!r} "
                              f"(expected one of {', '.join(self.classes)})")
        return cls

    def source(self, cls: str, seed: Seed) -> Source:
        """One device's continuous stream, starting with class `cls`, deterministic in `seed`."""
        return Source(self, cls, seed)

    def window(self, cls: str, n: int, rng: np.random.Generator) -> np.ndarray:
        """One independent bout of `n` samples, float32 ``(n, C)``; transient events
        (falls, door openings, fires) happen inside the window."""
        _check_count(n)
        bout = self._bout(self.check_class(cls), rng, prev=None, start_index=0, window_n=n)
        return self._finish(bout.render(n))

    def _finish(self, x: np.ndarray) -> np.ndarray:
        """Sensor output stage (e.g. range clipping), applied to every rendered block."""
        return x.astype(np.float32)

    @abstractmethod
    def _bout(self, cls: str, rng: np.random.Generator, prev: Bout | None, start_index: int,
              window_n: int | None = None) -> Bout:
        """Draw a bout of `cls` from `rng`. `prev` is the device's previous bout (carry its
        state over); `window_n` is set for an independent window of that many samples."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


def _check_count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"Invalid sample count: n={n!r} (expected an int >= 0)")
    return int(n)


class Source:
    """One device's sensor stream: bouts of the current class, continuous across calls.

    >>> from firmware_sim.sensors import get_model
    >>> src = get_model("imu").source("walk", seed=1)
    >>> src.read(16).shape
    (16, 6)
    >>> src.set_class("run")
    """

    def __init__(self, model: SensorModel, cls: str, seed: Seed):
        self.model = model
        self._rng = np.random.default_rng(seed)
        self._index = 0
        self._bout = model._bout(model.check_class(cls), self._rng, prev=None, start_index=0)
        self._fading: Bout | None = None  # the previous bout while it fades out
        self._fade_n = max(1, round(model.crossfade_s * model.rate_hz))

    @property
    def cls(self) -> str:
        """The class being generated now."""
        return self._bout.cls

    @property
    def t_s(self) -> float:
        """Stream time of the next sample `read` returns, in seconds."""
        return self._index / self.model.rate_hz

    @property
    def n_read(self) -> int:
        """Samples returned so far."""
        return self._index

    def read(self, n: int) -> np.ndarray:
        """The next `n` samples, float32 ``(n, C)``."""
        n = _check_count(n)
        x = self._bout.render(n)
        if self._fading is not None:
            # Blend weight of the new bout by sample index since the switch: chunk-invariant.
            k = self._index - self._bout.start_index + np.arange(n)
            w = smoothstep((k + 1) / (self._fade_n + 1))[:, None]  # (n, 1)
            x = w * x + (1.0 - w) * self._fading.render(n)
            if k[-1:].size and k[-1] + 1 >= self._fade_n:
                self._fading = None
        self._index += n
        return self.model._finish(x)

    def set_class(self, cls: str) -> None:
        """Continue with class `cls` (always a new bout, even for the same class)."""
        cls = self.model.check_class(cls)
        prev = self._bout
        self._bout = self.model._bout(cls, self._rng, prev=prev, start_index=self._index)
        self._fading = prev if self.model.crossfade_s > 0 else None


def make_dataset(model: SensorModel, n_per_class: int, window: int, seed: int = 0,
                 classes: Sequence[str] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Independent windows of each class, shuffled: ``(X (N, C, window) float32 channels
    first, y (N,) int64 indices into classes, classes)``, ``N = n_per_class * len(classes)``.

    >>> from firmware_sim.sensors import get_model
    >>> X, y, names = make_dataset(get_model("vibration"), 2, window=256)
    >>> X.shape, names[:2]
    ((12, 3, 256), ('healthy', 'imbalance'))
    """
    classes = model.classes if classes is None else tuple(classes)
    for c in classes:
        model.check_class(c)
    if not classes or len(set(classes)) != len(classes):
        raise ConfigError(f"Invalid classes: {classes!r} "
                          f"(expected distinct names from {model.classes})")
    for key, value in (("n_per_class", n_per_class), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ConfigError(f"Invalid {key}: {value!r} (expected an int >= 1)")
    rng = np.random.default_rng(seed)
    X = np.empty((n_per_class * len(classes), len(model.channels), window), np.float32)
    y = np.repeat(np.arange(len(classes), dtype=np.int64), n_per_class)
    for i, k in enumerate(y):
        X[i] = model.window(classes[k], window, rng).T  # (C, window)
    order = np.random.default_rng([seed, 1]).permutation(len(y))
    return X[order], y[order], classes


def check_param(model: str, key: str, value: float, lo: float = 0.0, hi: float = math.inf,
                *, lo_open: bool = True) -> float:
    """`value` as a float in (lo, hi] (or [lo, hi]); ConfigError naming `model.key` otherwise."""
    ok = (isinstance(value, int | float | np.number) and not isinstance(value, bool)
          and math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi)
    if not ok:
        bound = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi < math.inf else "")
        raise ConfigError(f"Invalid parameter {model}.{key}: {value!r} (expected a number {bound})")
    return float(value)
