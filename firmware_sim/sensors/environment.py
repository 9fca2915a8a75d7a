"""A slow indoor environment sensor: temperature, relative humidity, pressure, CO2.

Channels ``temperature`` (degC), ``humidity`` (%RH), ``pressure`` (hPa), ``co2`` (ppm) at
`rate_hz` (default 1 Hz: a 128-sample window covers two minutes). The room is a few
first-order physical quantities: air temperature ``T``, water-vapour pressure ``e`` and CO2
concentration; the humidity sensor reports ``RH = 100 e / e_s(T)`` with the Magnus formula
for the saturation pressure ``e_s``, so humidity moves against temperature the way it does
in a real room.

A device (a `Source`) has its room: a thermostat set point, a daily cycle (+-1 degC, 24 h,
at a random time of day), a slow wander (a few sinusoids with periods of 10-60 min), its
absolute humidity, the barometric pressure with the semi-diurnal atmospheric tide (+-0.8
hPa, 12 h) and a synoptic drift, and an occupancy-driven CO2 level. Classes add to that:

* ``normal``: the room as it is;
* ``hvac_fault``: the compressor short-cycles: the temperature hunts +-0.6-1.5 degC with a
  90-240 s period and drifts away from the set point (0.2-0.6 degC per minute up or down);
* ``door_open``: a door to the outside opens: temperature, vapour pressure and CO2 relax
  towards the outdoor values (time constant 40-100 s) while it is open (60-240 s), then back
  (time constant 150-400 s); gusts make the pressure flicker;
* ``fire``: a fire starts: temperature and CO2 grow exponentially (e-folding 20-60 s, up to
  +60 degC and +8000 ppm), vapour pressure rises with the combustion water, pressure rises.

The clean signal of a bout is a pure function of time; when a bout follows another, the gap
between the two at the switch decays with a 60 s time constant, so the room never jumps.
Sensor noise and quantisation as cheap digital sensors: 0.02 degC, 0.3 %RH, 0.02 hPa, 8 ppm.
"""

from __future__ import annotations

import math

import numpy as np

from firmware_sim.sensors.base import Bout, SensorModel, check_param, child_rng

CLASSES = ("normal", "hvac_fault", "door_open", "fire")
NOISE = np.array([0.02, 0.3, 0.02, 8.0])  # per channel
QUANTUM = np.array([0.01, 0.1, 0.01, 1.0])
CARRY_TAU_S = 60.0
DAY_S = 86_400.0


def saturation_hpa(t_c: np.ndarray) -> np.ndarray:
    """Saturation vapour pressure over water (Magnus, WMO), hPa."""
    return 6.112 * np.exp(17.62 * t_c / (243.12 + t_c))


class Room:
    """One device's room: the slow baseline shared by all its bouts (pure functions of
    absolute stream time `t` in seconds)."""

    def __init__(self, model: EnvironmentModel, rng: np.random.Generator):
        self.setpoint_c = model.setpoint_c + rng.uniform(-2.0, 2.0)
        self.outdoor_c = model.outdoor_c + rng.uniform(-5.0, 5.0)
        self.time_of_day_s = rng.uniform(0, DAY_S)
        self.day_amp_c = rng.uniform(0.5, 1.5)
        self.wander = (rng.uniform(600, 3600, 3), rng.uniform(0, 2 * math.pi, 3),
                       rng.uniform(0.05, 0.25, 3))  # periods s, phases, amplitudes degC
        rh = rng.uniform(30, 60)
        self.vapour_hpa = rh / 100 * float(saturation_hpa(np.array(self.setpoint_c)))
        self.outdoor_vapour_hpa = rng.uniform(0.5, 0.95) * float(
            saturation_hpa(np.array(self.outdoor_c)))
        self.pressure_hpa = model.pressure_hpa + rng.normal(0, 8)
        self.synoptic = (rng.uniform(-2, 2) / 3600, rng.uniform(0, 2 * math.pi))  # hPa/s, tide
        self.co2_ppm = rng.uniform(450, 900)

    def baseline(self, t: np.ndarray) -> np.ndarray:
        """(n, 4): temperature degC, vapour pressure hPa, pressure hPa, CO2 ppm."""
        periods, phases, amps = self.wander
        day = 2 * math.pi * (t + self.time_of_day_s) / DAY_S
        temp = (self.setpoint_c + self.day_amp_c * np.sin(day - 2.0)
                + (amps * np.sin(2 * math.pi * t[:, None] / periods + phases)).sum(1))
        vapour = self.vapour_hpa * (1 + 0.03 * np.sin(day - 1.0))
        rate, tide = self.synoptic
        pressure = (self.pressure_hpa + rate * (t % 21_600)  # a drift, reset every 6 h
                    + 0.8 * np.sin(2 * day + tide))
        co2 = self.co2_ppm * (1 + 0.15 * np.sin(day - 2.5))
        return np.stack([temp, vapour, pressure, co2], axis=1)


class EnvironmentBout(Bout):
    """One bout: the room's baseline, the class's effect, the carry-over from the last bout."""

    def __init__(self, model: EnvironmentModel, cls: str, rng: np.random.Generator,
                 prev: Bout | None, start_index: int, window_n: int | None):
        super().__init__(cls, start_index)
        self.rate = model.rate_hz
        self.room = prev.room if isinstance(prev, EnvironmentBout) else Room(model, rng)
        self.t0 = start_index / self.rate  # stream time of the bout start
        span_s = (window_n or 0) / self.rate
        # Transients start within the first half of a window, soon after a stream switch.
        latest = 0.35 if cls == "fire" else 0.5  # a window shows a fire's growth
        self.event_s = rng.uniform(0.05, latest) * span_s if window_n else rng.uniform(0, 10)
        if cls == "hvac_fault":
            self.period_s = rng.uniform(90, 240)
            self.hunt_c = rng.uniform(0.6, 1.5)
            self.drift_c_s = rng.choice([-1, 1]) * rng.uniform(0.2, 0.6) / 60
            self.phase = rng.uniform(0, 2 * math.pi)
        elif cls == "door_open":
            self.open_s = rng.uniform(60, 240)
            self.tau_open_s = rng.uniform(40, 100)
            self.tau_close_s = rng.uniform(150, 400)
            self.gust_hz = rng.uniform(0.05, 0.2, 3)
            self.gust_phase = rng.uniform(0, 2 * math.pi, 3)
        elif cls == "fire":
            self.tau_s = rng.uniform(20, 60)
            self.seed_c = rng.uniform(0.5, 2.0)  # the first visible rise
            self.co2_per_c = rng.uniform(80, 200)
        self.carry = np.zeros(4)
        if isinstance(prev, EnvironmentBout):
            at = np.array([self.t0])
            self.carry = prev.state(at)[0] - self.clean(at)[0]
        self.noise_rng = child_rng(rng)

    def clean(self, t: np.ndarray) -> np.ndarray:
        """Noise-free (n, 4) [T, e, p, CO2] at absolute stream times `t` (s)."""
        x = self.room.baseline(t)
        u = t - self.t0 - self.event_s  # time since the event (hvac: since bout start)
        room = self.room
        if self.cls == "hvac_fault":
            tb = t - self.t0
            hunt = (self.hunt_c * np.sin(2 * math.pi * tb / self.period_s + self.phase)
                    + self.drift_c_s * tb)
            x[:, 0] += hunt
            x[:, 1] *= 1 - 0.02 * hunt  # the coil condenses water as it cools
        elif self.cls == "door_open":
            open_u = np.clip(u, 0, self.open_s)
            mix = 1 - np.exp(-open_u / self.tau_open_s)  # share of outdoor air
            closed = np.maximum(u - self.open_s, 0)
            mix = mix * np.exp(-closed / self.tau_close_s)
            outdoor = np.array([room.outdoor_c, room.outdoor_vapour_hpa, 0.0, 420.0])
            for c in (0, 1, 3):
                x[:, c] += mix * (outdoor[c] - x[:, c])
            gusts = (np.sin(2 * math.pi * self.gust_hz * u[:, None] + self.gust_phase)).sum(1)
            x[:, 2] += np.where((u > 0) & (u < self.open_s), 0.08 * gusts, 0.0)
        elif self.cls == "fire":
            grow = np.where(u > 0, self.seed_c * np.expm1(np.maximum(u, 0) / self.tau_s), 0.0)
            rise = 60.0 * np.tanh(grow / 60.0)  # the sensor's housing limits what it sees
            x[:, 0] += rise
            x[:, 1] += 0.04 * rise
            x[:, 2] += 0.01 * rise
            x[:, 3] += self.co2_per_c * rise
        return x

    def state(self, t: np.ndarray) -> np.ndarray:
        """`clean` plus what is left of the previous bout's gap: the room the sensor sees."""
        return self.clean(t) + self.carry * np.exp(-(t - self.t0) / CARRY_TAU_S)[:, None]

    def _render(self, i0: int, n: int) -> np.ndarray:
        x = self.state((i0 + np.arange(n)) / self.rate)  # at absolute stream times
        rh = 100 * x[:, 1] / saturation_hpa(x[:, 0])
        x[:, 1] = np.clip(rh, 0.0, 100.0)
        x += NOISE * self.noise_rng.standard_normal((n, 4))
        return np.round(x / QUANTUM) * QUANTUM


class EnvironmentModel(SensorModel):
    """Indoor climate sensor (module docstring).

    >>> env = EnvironmentModel()
    >>> env.window("fire", 128, np.random.default_rng(0)).shape
    (128, 4)
    """

    name = "environment"
    channels = ("temperature", "humidity", "pressure", "co2")
    units = ("degC", "%RH", "hPa", "ppm")
    classes = CLASSES
    crossfade_s = 0.0  # the carry-over term keeps the room continuous

    def __init__(self, rate_hz: float = 1.0, setpoint_c: float = 21.0, outdoor_c: float = 8.0,
                 pressure_hpa: float = 1013.0):
        n = self.name
        self.rate_hz = check_param(n, "rate_hz", rate_hz, 0.0, 10.0)
        self.setpoint_c = check_param(n, "setpoint_c", setpoint_c, 5.0, 35.0, lo_open=False)
        self.outdoor_c = check_param(n, "outdoor_c", outdoor_c, -30.0, 45.0, lo_open=False)
        self.pressure_hpa = check_param(n, "pressure_hpa", pressure_hpa, 800.0, 1100.0)

    def _bout(self, cls, rng, prev, start_index, window_n=None) -> Bout:
        return EnvironmentBout(self, cls, rng, prev, start_index, window_n)
