"""Vibration of a rotating machine: a 3-axis accelerometer on a bearing housing.

Channels ``x`` (radial, horizontal), ``y`` (radial, vertical, the load direction) and ``z``
(axial), in g, AC-coupled (no gravity, like a piezo sensor). The shaft turns at
``f_r = rpm / 60`` (each bout draws its speed within +-`rpm_jitter`). Classes follow the
textbook fault signatures (ISO 13373, Randall's *Vibration-based Condition Monitoring*):

* ``healthy``: a small residual imbalance at 1x, a little 2x, broadband noise;
* ``imbalance``: a strong 1x, radial, x and y in quadrature (a rotating force);
* ``misalignment``: a strong 2x radially and strong 1x and 2x axially;
* ``outer_race``: a defect on the stationary race is struck at the ball-pass frequency
  ``BPFO = n/2 f_r (1 - d/D cos a)`` with constant strength; every strike rings the
  housing's structural resonance (a damped sinusoid at `resonance_hz`);
* ``inner_race``: strikes at ``BPFI = n/2 f_r (1 + d/D cos a)``, amplitude-modulated at 1x
  as the defect rotates through the load zone (sidebands at BPFI +- f_r in the envelope);
* ``looseness``: many harmonics of 1x plus half-order sub-harmonics (0.5x, 1.5x, ...),
  from the rattle of a loose foot.

Bearing strikes are random events: the intervals jitter by 1 % (rolling elements slip) and
each strike's strength by 10 %. They are drawn lazily in time order from their own rng,
so a stream's output does not depend on how it is read in chunks. Default geometry: a 6205
deep-groove ball bearing (9 balls, 7.94 mm balls on a 39.04 mm pitch circle, 0 degrees),
BPFO = 3.58 f_r, BPFI = 5.42 f_r; at 1800 rpm 107.5 Hz and 162.5 Hz.
"""

from __future__ import annotations

import math

import numpy as np

from agent.errors import ConfigError
from firmware_sim.sensors.base import Bout, SensorModel, check_param, child_rng

CLASSES = ("healthy", "imbalance", "misalignment", "outer_race", "inner_race", "looseness")
RING_DECAY = 7.0  # a strike's ringing is cut after exp(-7) of its peak
SLIP = 0.01
INNER_MOD = 0.6  # depth of the 1x modulation of inner-race strikes (load zone)


def bearing_frequencies(rpm: float, n_balls: int, ball_diameter_mm: float,
                        pitch_diameter_mm: float, contact_angle_deg: float) -> dict[str, float]:
    """Characteristic bearing frequencies in Hz: ``bpfo, bpfi, bsf, ftf`` (and ``f_r``).

    >>> round(bearing_frequencies(1800, 9, 7.94, 39.04, 0)["bpfo"], 1)
    107.5
    """
    f_r = rpm / 60.0
    ratio = ball_diameter_mm / pitch_diameter_mm * math.cos(math.radians(contact_angle_deg))
    return {"f_r": f_r,
            "bpfo": n_balls / 2 * f_r * (1 - ratio),
            "bpfi": n_balls / 2 * f_r * (1 + ratio),
            "bsf": pitch_diameter_mm / (2 * ball_diameter_mm) * f_r * (1 - ratio ** 2),
            "ftf": f_r / 2 * (1 - ratio)}


# Per class: harmonic content (order of f_r -> (x, y, z) amplitude in g at the nominal speed).
HARMONICS: dict[str, dict[float, tuple[float, float, float]]] = {
    "healthy": {1: (0.04, 0.04, 0.01), 2: (0.01, 0.01, 0.005)},
    "imbalance": {1: (0.45, 0.45, 0.04), 2: (0.02, 0.02, 0.01)},
    "misalignment": {1: (0.08, 0.08, 0.30), 2: (0.30, 0.30, 0.35), 3: (0.05, 0.05, 0.08)},
    "outer_race": {1: (0.04, 0.04, 0.01), 2: (0.01, 0.01, 0.005)},
    "inner_race": {1: (0.06, 0.06, 0.015), 2: (0.01, 0.01, 0.005)},
    "looseness": {0.5: (0.05, 0.10, 0.02), 1: (0.12, 0.20, 0.03), 1.5: (0.04, 0.08, 0.02),
                  2: (0.09, 0.16, 0.03), 2.5: (0.03, 0.06, 0.01), 3: (0.07, 0.13, 0.02),
                  4: (0.06, 0.10, 0.02), 5: (0.05, 0.08, 0.02), 6: (0.04, 0.07, 0.01),
                  7: (0.03, 0.05, 0.01), 8: (0.03, 0.04, 0.01)},
}
STRIKE_G = {"outer_race": 1.2, "inner_race": 1.0}  # ringing peak per strike, g
STRIKE_AXES = np.array([0.5, 1.0, 0.2])  # the load zone is vertical


class VibrationBout(Bout):
    """One bout: shaft harmonics (a function of the sample index) plus bearing strikes."""

    def __init__(self, model: VibrationModel, cls: str, rng: np.random.Generator,
                 prev: Bout | None, start_index: int, window_n: int | None):
        super().__init__(cls, start_index)
        self.rate = model.rate_hz
        speed = 1 + model.rpm_jitter * rng.uniform(-1, 1)
        self.freqs = model.frequencies(model.rpm * speed)
        f_r = self.freqs["f_r"]
        severity = math.exp(0.25 * rng.standard_normal())
        # Force from imbalance grows with speed squared; the other terms roughly with speed.
        gain = severity * speed ** 2
        self.orders = np.array(list(HARMONICS[cls]), float)  # (H,)
        amps = np.array(list(HARMONICS[cls].values())) * gain  # (H, 3)
        self.amps = amps * np.abs(1 + 0.1 * rng.standard_normal(amps.shape))
        self.phases = rng.uniform(0, 2 * math.pi, amps.shape)  # (H, 3)
        self.phases[:, 1] = self.phases[:, 0] - math.pi / 2  # radial axes in quadrature
        self.omega_r = 2 * math.pi * f_r
        self.noise = model.noise_g * (1 + 0.25 * rng.uniform(-1, 1))
        f_n = model.resonance_hz * (1 + 0.05 * rng.uniform(-1, 1))
        zeta = model.damping
        self.ring = (2 * math.pi * f_n * zeta, 2 * math.pi * f_n * math.sqrt(1 - zeta ** 2))
        self.ring_s = RING_DECAY / self.ring[0]
        self.strike_hz = {"outer_race": self.freqs["bpfo"],
                          "inner_race": self.freqs["bpfi"]}.get(cls, 0.0)
        self.strike_g = STRIKE_G.get(cls, 0.0) * severity * speed
        self.mod_phase = rng.uniform(0, 2 * math.pi)
        self.event_rng = child_rng(rng)
        self.noise_rng = child_rng(rng)
        # Strike times (s since bout start, may be < 0 so a window starts mid-stream).
        self.next_strike = -self.ring_s + rng.uniform(0, 1) / max(self.strike_hz, 1e-9)
        self.strikes_t = np.empty(0)
        self.strikes_a = np.empty(0)

    def _more_strikes(self, until_s: float) -> None:
        """Draw strikes in time order up to `until_s`."""
        if self.strike_hz <= 0:
            return
        times, amps = [], []
        while self.next_strike < until_s:
            t = self.next_strike
            a = self.strike_g * (1 + 0.1 * self.event_rng.standard_normal())
            if self.cls == "inner_race":  # the defect passes through the load zone once a turn
                a *= (1 + INNER_MOD * math.cos(self.omega_r * t + self.mod_phase)) / (1 + INNER_MOD)
            times.append(t)
            amps.append(a)
            gap = 1 + SLIP * self.event_rng.standard_normal()
            self.next_strike = t + max(gap, 0.5) / self.strike_hz
        if times:
            self.strikes_t = np.concatenate([self.strikes_t, times])
            self.strikes_a = np.concatenate([self.strikes_a, amps])

    def _strikes(self, k: np.ndarray) -> np.ndarray:
        """Sum of the ringing of every strike that reaches bout samples `k` (n,) ints.

        Whether strike s reaches sample j depends only on ``j / rate - t_s`` (in
        ``[0, ring_s)``), and contributions add in strike order: chunk-invariant."""
        out = np.zeros(len(k))
        if self.strike_hz <= 0 or not len(k):
            return out
        self._more_strikes(k[-1] / self.rate)
        keep = self.strikes_t >= k[0] / self.rate - self.ring_s
        self.strikes_t, self.strikes_a = self.strikes_t[keep], self.strikes_a[keep]
        decay, omega_d = self.ring
        span = int(math.ceil(self.ring_s * self.rate)) + 2
        for lo in range(0, len(k), 4096):  # bounded memory for long reads
            kk = k[lo:lo + 4096]
            k0, k1 = int(kk[0]), int(kk[-1])
            sel = (self.strikes_t <= k1 / self.rate) & (self.strikes_t >= k0 / self.rate
                                                        - self.ring_s)
            ts, amp = self.strikes_t[sel], self.strikes_a[sel]
            first = np.floor(ts * self.rate).astype(np.int64)  # (m,) sample at or before
            j = first[:, None] + np.arange(span)  # (m, span) bout sample indices
            dt = j / self.rate - ts[:, None]
            ok = (j >= k0) & (j <= k1) & (dt >= 0) & (dt < self.ring_s)
            val = amp[:, None] * np.exp(-decay * dt) * np.sin(omega_d * dt)
            out[lo:lo + len(kk)] = np.bincount(j[ok] - k0, val[ok], minlength=len(kk))
        return out

    def _render(self, i0: int, n: int) -> np.ndarray:
        k = i0 - self.start_index + np.arange(n)
        t = k / self.rate  # (n,)
        arg = self.omega_r * t[:, None, None] * self.orders[None, :, None] + self.phases  # (n,H,3)
        out = (self.amps * np.sin(arg)).sum(axis=1)  # (n, 3)
        out += self._strikes(k)[:, None] * STRIKE_AXES
        return out + self.noise * self.noise_rng.standard_normal((n, 3))


class VibrationModel(SensorModel):
    """3-axis vibration of a machine with a rolling-element bearing (module docstring).

    >>> m = VibrationModel(rpm=1800)
    >>> round(m.frequencies()["bpfi"], 1)
    162.5
    """

    name = "vibration"
    channels = ("x", "y", "z")
    units = ("g", "g", "g")
    classes = CLASSES
    crossfade_s = 0.2

    def __init__(self, rate_hz: float = 1000.0, rpm: float = 1800.0, rpm_jitter: float = 0.05,
                 n_balls: int = 9, ball_diameter_mm: float = 7.94,
                 pitch_diameter_mm: float = 39.04, contact_angle_deg: float = 0.0,
                 resonance_hz: float = 350.0, damping: float = 0.05, noise_g: float = 0.02):
        n = self.name
        self.rate_hz = check_param(n, "rate_hz", rate_hz, 100.0, 100_000.0, lo_open=False)
        self.rpm = check_param(n, "rpm", rpm, 0.0, 60_000.0)
        self.rpm_jitter = check_param(n, "rpm_jitter", rpm_jitter, 0.0, 0.5, lo_open=False)
        if isinstance(n_balls, bool) or not isinstance(n_balls, int) or not 3 <= n_balls <= 100:
            raise ConfigError(f"Invalid parameter vibration.n_balls: {n_balls!r} "
                              f"(expected an int from 3 to 100)")
        self.n_balls = n_balls
        self.ball_diameter_mm = check_param(n, "ball_diameter_mm", ball_diameter_mm)
        self.pitch_diameter_mm = check_param(n, "pitch_diameter_mm", pitch_diameter_mm,
                                             self.ball_diameter_mm)
        self.contact_angle_deg = check_param(n, "contact_angle_deg", contact_angle_deg, 0.0,
                                             45.0, lo_open=False)
        self.resonance_hz = check_param(n, "resonance_hz", resonance_hz, 0.0,
                                        0.45 * self.rate_hz)
        self.damping = check_param(n, "damping", damping, 0.0, 0.5)
        self.noise_g = check_param(n, "noise_g", noise_g, lo_open=False)
        top = max(HARMONICS["looseness"]) * self.rpm * (1 + self.rpm_jitter) / 60
        bpfi = self.frequencies(self.rpm * (1 + self.rpm_jitter))["bpfi"]
        if max(top, bpfi) >= self.rate_hz / 2:
            raise ConfigError(f"Invalid parameter vibration.rpm: {rpm!r} (its harmonics up to "
                              f"{max(top, bpfi):.0f} Hz exceed the Nyquist frequency "
                              f"{self.rate_hz / 2:g} Hz of rate_hz={self.rate_hz:g})")

    def frequencies(self, rpm: float | None = None) -> dict[str, float]:
        """`bearing_frequencies` of this bearing at `rpm` (default: the nominal speed)."""
        return bearing_frequencies(self.rpm if rpm is None else rpm, self.n_balls,
                                   self.ball_diameter_mm, self.pitch_diameter_mm,
                                   self.contact_angle_deg)

    def _bout(self, cls, rng, prev, start_index, window_n=None) -> Bout:
        return VibrationBout(self, cls, rng, prev, start_index, window_n)
