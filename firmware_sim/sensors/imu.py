"""A body-worn IMU (accelerometer + gyroscope, 6 channels) driven by simple rigid-body kinematics.

The device has an orientation (Z-Y-X Euler angles roll, pitch, yaw from the wearer's
heading frame: x forward, y left, z up) and a linear acceleration in that frame. The sensors
read what a real IMU reads:

* accelerometer: the specific force in the device frame, ``R^T (a + g z)`` in g, so gravity
  rotates with the device (at rest it reads 1 g along whatever axis points up);
* gyroscope: the body angular rate from the Euler rates
  (``p = roll' - yaw' sin(pitch)``, ...) in rad/s;

plus a per-device bias (carried across bouts), white noise and range clipping
(+-`accel_range_g`, +-`gyro_range_rad_s`).

Motions are periodic in a gait phase: a step rate `f_hz` with harmonics (the heel-strike
shape), vertical and fore-aft acceleration and pitch at the step rate, lateral sway, roll
and yaw at the stride rate (half the step rate), the way a waist-worn sensor sees walking.
The step rate drifts slowly within a bout (+-3 %, period 8-20 s). Each bout draws its own
variation: step rate +-10 %, intensity (log-normal, sigma 0.2), +-10 % per axis, the mount
orientation tilted by up to 8 degrees, noise +-25 % (all scaled by `variation`).

A new bout turns the device from the previous bout's orientation to its own over 0.8 s
(the turn shows on the gyroscope) and `Source` cross-fades the motions over 0.5 s.

`fall` is a transient: standing still, then a free fall of 0.3-0.5 s (the accelerometer
reads ~0 g while the device tumbles towards lying), an impact whose half-sine pulse carries
the momentum of the fall (``area = g * t_fall * (1 + restitution)``, ~5-15 g), a damped
bounce, then lying still in a random lying orientation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from firmware_sim.sensors.base import Bout, SensorModel, check_param, child_rng, smoothstep
from firmware_sim.sensors.base import smoothstep_slope as _dsmooth

TURN_S = 0.8  # reorientation at the start of a bout that follows another
FM_DEPTH = 0.03  # slow step-rate drift within a bout
_D = math.radians


@dataclass(frozen=True)
class Motion:
    """The generator of one class. Motion axes: fore-aft, lateral, vertical acceleration (g),
    then roll, pitch, yaw oscillation (degrees); `stride` marks the axes moving at half the
    step rate."""

    name: str
    f_hz: float
    harmonics: tuple[float, ...]  # relative amplitude of f, 2f, 3f, ...
    amplitude: tuple[float, float, float, float, float, float]
    lag_rad: tuple[float, float, float, float, float, float]
    stride: tuple[bool, bool, bool, bool, bool, bool]
    mount_deg: tuple[float, float]  # roll, pitch of the device while doing this
    noise: tuple[float, float]  # white noise (unmodelled motion + sensor), g and rad/s


_Q = math.pi / 2
_GAIT = (False, True, False, True, False, True)  # lateral, roll, yaw at the stride rate
_STILL = (False,) * 6
MOTIONS: dict[str, Motion] = {m.name: m for m in (
    # On a table: breathing-rate sway of the surface, the sensor's own noise.
    Motion("idle", 0.25, (1.0,), (0.003, 0.003, 0.004, 0.3, 0.3, 0.2),
           (0, _Q, 0, _Q, 0, 0), _STILL, (0.0, 0.0), (0.004, 0.004)),
    # Heel strikes load the vertical axis; the pelvis rocks and twists at the stride rate.
    Motion("walk", 1.8, (1.0, 0.45, 0.15), (0.20, 0.10, 0.28, 4.0, 2.0, 5.0),
           (_Q, 0, 0, _Q, _Q, 0), _GAIT, (0.0, 5.0), (0.03, 0.05)),
    # Faster and harder, with a sharp (harmonic-rich) impact.
    Motion("run", 2.8, (1.0, 0.6, 0.3), (0.40, 0.20, 1.00, 6.0, 4.0, 8.0),
           (_Q, 0, 0, _Q, _Q, 0), _GAIT, (0.0, 10.0), (0.06, 0.10)),
    # Slower cadence, leaning forward, a strong 2nd harmonic from lift-then-step.
    Motion("stairs", 1.5, (1.0, 0.75, 0.3), (0.12, 0.10, 0.32, 4.0, 4.0, 4.0),
           (_Q, 0, 0, _Q, _Q, 0), _GAIT, (0.0, 14.0), (0.04, 0.05)),
    # Shaken by hand side to side: fast, large lateral acceleration and a twist about z.
    Motion("shake", 5.0, (1.0, 0.3), (0.25, 1.20, 0.15, 1.5, 1.0, 6.0),
           (0, 0, _Q, _Q, 0, _Q), _STILL, (0.0, 0.0), (0.08, 0.10)),
    # Lying on its side and rocking slowly: gravity swings between the axes.
    Motion("tilt", 0.6, (1.0, 0.2), (0.02, 0.02, 0.02, 3.0, 15.0, 3.0),
           (0, _Q, _Q, 0, _Q, 0), _STILL, (70.0, 0.0), (0.01, 0.02)),
    # Standing (tiny postural sway) until the fall; the transient is rendered separately.
    Motion("fall", 0.3, (1.0,), (0.01, 0.01, 0.01, 0.5, 0.5, 0.3),
           (0, _Q, 0, _Q, 0, 0), _STILL, (0.0, 3.0), (0.01, 0.01)),
)}
LYING_DEG = ((90.0, 0.0), (-90.0, 0.0), (0.0, 80.0), (0.0, -80.0), (180.0, 0.0))


def specific_force(angles: np.ndarray, accel: np.ndarray) -> np.ndarray:
    """Accelerometer reading ``R^T (a + z)`` for Z-Y-X Euler `angles` (n, 3) [roll, pitch,
    yaw] and world acceleration `accel` (n, 3) in g. Returns (n, 3)."""
    r, p, y = angles.T
    vx, vy, vz = accel[:, 0], accel[:, 1], accel[:, 2] + 1.0
    vx, vy = np.cos(y) * vx + np.sin(y) * vy, -np.sin(y) * vx + np.cos(y) * vy  # Rz^T
    vx, vz = np.cos(p) * vx - np.sin(p) * vz, np.sin(p) * vx + np.cos(p) * vz  # Ry^T
    vy, vz = np.cos(r) * vy + np.sin(r) * vz, -np.sin(r) * vy + np.cos(r) * vz  # Rx^T
    return np.stack([vx, vy, vz], axis=1)


def body_rates(angles: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Gyroscope reading from Z-Y-X Euler `angles` (n, 3) and their time derivatives (n, 3)."""
    r, p, _ = angles.T
    dr, dp, dy = rates.T
    return np.stack([dr - dy * np.sin(p),
                     dp * np.cos(r) + dy * np.cos(p) * np.sin(r),
                     -dp * np.sin(r) + dy * np.cos(p) * np.cos(r)], axis=1)


class ImuBout(Bout):
    """One bout: gait phase, orientation turns, optional fall transient, bias and noise."""

    def __init__(self, model: ImuModel, cls: str, rng: np.random.Generator, prev: Bout | None,
                 start_index: int, window_n: int | None):
        super().__init__(cls, start_index)
        m, v, self.rate = MOTIONS[cls], model.variation, model.rate_hz
        self.motion = m
        self.f_hz = m.f_hz * (1 + v * rng.uniform(-0.1, 0.1))
        intensity = math.exp(v * 0.2 * rng.standard_normal())
        amp = np.asarray(m.amplitude) * intensity * np.abs(1 + v * 0.1 * rng.standard_normal(6))
        amp[3:] = np.radians(amp[3:])
        self.amp = amp  # (6,)
        self.phase0 = rng.uniform(0, 2 * math.pi)
        self.fm_period_s = rng.uniform(8.0, 20.0)
        self.fm_phase = rng.uniform(0, 2 * math.pi)
        self.noise = (np.repeat(m.noise, 3) * model.noise_scale
                      * (1 + v * rng.uniform(-0.25, 0.25)))  # (6,)
        target = np.array([_D(m.mount_deg[0]), _D(m.mount_deg[1]), 0.0])
        target += v * _D(8.0) / math.sqrt(3) * rng.uniform(-1, 1, 3)
        # Base orientation: a list of smooth turns (t_start_s, t_end_s, delta (3,)).
        self.turns: list[tuple[float, float, np.ndarray]] = []
        if isinstance(prev, ImuBout):
            self.bias = prev.bias
            start = prev.orientation(prev.index)
            self.turns.append((0.0, TURN_S, target - start))
        else:
            self.bias = np.concatenate([rng.normal(0, 0.01, 3), rng.normal(0, 0.005, 3)])
            self.bias *= model.bias_scale
            start = target
        self.angle0 = start
        self.fall: tuple[float, float, float, float, np.ndarray] | None = None
        if cls == "fall":
            self._plan_fall(rng, target, window_n)
        self.noise_rng = child_rng(rng)

    def _plan_fall(self, rng: np.random.Generator, standing: np.ndarray, window_n: int | None
                   ) -> None:
        t_fall = rng.uniform(0.3, 0.5)  # free fall from 0.45-1.2 m
        impact_s = rng.uniform(0.04, 0.1)
        if window_n is None:
            t0 = rng.uniform(0.3, 1.5)
        else:  # the whole event inside the window when it fits
            room = window_n / self.rate - t_fall - impact_s - 0.8  # the bounce settles
            t0 = rng.uniform(0.1, max(0.1, room))
        lying = np.radians(LYING_DEG[rng.integers(len(LYING_DEG))]) + rng.normal(0, _D(10), 2)
        self.turns.append((t0, t0 + t_fall + 0.1, np.append(lying, rng.uniform(-1, 1)) - standing))
        restitution = rng.uniform(0.1, 0.4)
        direction = np.array([rng.normal(0, 0.3), rng.normal(0, 0.3), 1.0])
        peak = t_fall * (1 + restitution) * math.pi / (2 * impact_s)  # half-sine of that area
        self.fall = (t0, t_fall, impact_s, peak, direction)

    def orientation(self, index: int) -> np.ndarray:
        """Base orientation (roll, pitch, yaw) at source sample `index`."""
        t = np.array([(index - self.start_index) / self.rate])
        return self._base(t)[0][0]

    def _base(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        angles = np.broadcast_to(self.angle0, (len(t), 3)).copy()
        rates = np.zeros((len(t), 3))
        for ta, tb, delta in self.turns:
            u = (t - ta) / (tb - ta)
            angles += smoothstep(u)[:, None] * delta
            rates += (_dsmooth(u) / (tb - ta))[:, None] * delta
        return angles, rates

    def _render(self, i0: int, n: int) -> np.ndarray:
        t = (i0 - self.start_index + np.arange(n)) / self.rate  # (n,) s since bout start
        # Gait phase with a slow step-rate drift, and its derivative.
        w = 2 * math.pi / self.fm_period_s
        phase = self.phase0 + 2 * math.pi * self.f_hz * (
            t + FM_DEPTH / w * (math.cos(self.fm_phase) - np.cos(w * t + self.fm_phase)))
        dphase = 2 * math.pi * self.f_hz * (1 + FM_DEPTH * np.sin(w * t + self.fm_phase))
        mult = np.where(self.motion.stride, 0.5, 1.0)  # (6,)
        theta = phase[:, None] * mult - np.asarray(self.motion.lag_rad)  # (n, 6)
        wave = np.zeros((n, 6))
        dwave = np.zeros((n, 6))
        for k, h in enumerate(self.motion.harmonics, start=1):
            wave += h * np.sin(k * theta)
            dwave += h * k * np.cos(k * theta)
        motion = self.amp * wave  # (n, 6)
        accel = motion[:, :3]
        base, base_rates = self._base(t)
        angles = base + motion[:, 3:]
        rates = base_rates + self.amp[3:] * dwave[:, 3:] * (mult[3:] * dphase[:, None])
        if self.fall is not None:
            accel = accel + self._fall_accel(t)
        out = np.concatenate([specific_force(angles, accel), body_rates(angles, rates)], axis=1)
        return out + self.bias + self.noise * self.noise_rng.standard_normal((n, 6))

    def _fall_accel(self, t: np.ndarray) -> np.ndarray:
        """World acceleration of the fall (n, 3): -1 g in free fall, the impact, a bounce."""
        t0, t_fall, impact_s, peak, direction = self.fall
        t1 = t0 + t_fall
        gate = smoothstep((t - t0) / 0.03) - smoothstep((t - t1) / 0.03)
        u = (t - t1) / impact_s
        pulse = np.where((u >= 0) & (u <= 1), peak * np.sin(math.pi * np.clip(u, 0, 1)), 0.0)
        tb = t - t1 - impact_s
        bounce = np.where(tb > 0, 0.15 * peak * np.exp(-np.maximum(tb, 0) / 0.08)
                          * np.sin(2 * math.pi * 8.0 * tb), 0.0)
        a = (pulse + bounce)[:, None] * direction
        a[:, 2] -= gate
        return a


class ImuModel(SensorModel):
    """6-channel IMU: ``ax ay az`` in g, ``gx gy gz`` in rad/s (see the module docstring).

    >>> imu = ImuModel()
    >>> imu.window("fall", 128, np.random.default_rng(0)).shape
    (128, 6)
    """

    name = "imu"
    channels = ("ax", "ay", "az", "gx", "gy", "gz")
    units = ("g", "g", "g", "rad/s", "rad/s", "rad/s")
    classes = tuple(MOTIONS)
    crossfade_s = 0.5

    def __init__(self, rate_hz: float = 50.0, noise_scale: float = 1.0, bias_scale: float = 1.0,
                 variation: float = 1.0, accel_range_g: float = 16.0,
                 gyro_range_rad_s: float = 34.9):
        self.rate_hz = check_param(self.name, "rate_hz", rate_hz, 5.0, 10_000.0, lo_open=False)
        self.noise_scale = check_param(self.name, "noise_scale", noise_scale, lo_open=False)
        self.bias_scale = check_param(self.name, "bias_scale", bias_scale, lo_open=False)
        self.variation = check_param(self.name, "variation", variation, 0.0, 2.0, lo_open=False)
        self.accel_range_g = check_param(self.name, "accel_range_g", accel_range_g, 1.0)
        self.gyro_range_rad_s = check_param(self.name, "gyro_range_rad_s", gyro_range_rad_s, 1.0)

    def _bout(self, cls, rng, prev, start_index, window_n=None) -> Bout:
        return ImuBout(self, cls, rng, prev, start_index, window_n)

    def _finish(self, x: np.ndarray) -> np.ndarray:
        limits = np.array([self.accel_range_g] * 3 + [self.gyro_range_rad_s] * 3)
        return np.clip(x, -limits, limits).astype(np.float32)
