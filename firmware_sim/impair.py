"""Impairments of one simulated device: sensor drift and faults, network faults, the label oracle.

Each class here is a small seeded state machine owned by one device, so what a device sends
depends only on the scenario, the seed and the call sequence, never on timing or on other
devices. Their decisions draw a fixed number of random numbers per call, whatever the
outcome, so changing one probability does not reshuffle every later decision.

* `DeviceImpairment` turns clean sensor samples into what a worn, faulty sensor reports.
  Drift grows with stream time ``t`` (hours ``h``): each channel's gain is
  ``1 + gain_per_h * h * a`` and its offset ``offset_per_h * h * b``, with ``a, b`` drawn per
  device and channel in [0.5, 1] (devices age differently, all in the configured
  direction); white noise of std ``noise_growth_per_h * h`` is added, and a bias random walk
  with per-sample step std ``bias_walk``. Faults hit a seeded subset of the fleet
  (`fault_devices`): *stuck* repeats the last value reported before the fault, *saturation*
  clips to ``[-level, level]``, and *dropout* makes the device send nothing: `apply` leaves
  the values alone and `silent` tells the runner not to publish (a dead sensor sends no
  frames rather than frames of zeros, which the agent could not tell from a real signal).
* `NetworkShaper` decides what reaches the broker: nothing while disconnected (frames are
  lost, as on a device without an outbox), bursts of lost frames, duplicates, frames held
  back and released after ``reorder_depth`` later frames, and malformed replacements built
  with the agent's own encoders (truncated binary, broken JSON, NaN in JSON, the wrong
  channel count). `flush` releases the held frames at the end, so reordering loses nothing.
* `Oracle` decides which class segments get a label, when it is published and whether it is
  wrong (see `LabelOracle`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.errors import ConfigError, ProtocolError
from agent.protocol import BINARY_MAGIC, decode_frame, encode_frame_binary, encode_frame_json
from firmware_sim.scenario import LabelOracle, Network, Scenario, SensorFault

Seed = int | np.random.SeedSequence
MALFORMED_KINDS = ("truncated", "bad_json", "nan_json", "wrong_channels")


def _seq(seed: Seed) -> np.random.SeedSequence:
    return seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)


def fault_devices(scenario: Scenario, fault_index: int) -> frozenset[int]:
    """The device indices hit by ``scenario.faults[fault_index]``: ``round(devices * count)``
    of them (at least one), the same for every device that asks."""
    fault = scenario.faults[fault_index]
    k = min(scenario.devices, max(1, round(fault.devices * scenario.devices)))
    rng = np.random.default_rng([scenario.seed, 0xFA17, fault_index])
    return frozenset(int(i) for i in rng.permutation(scenario.devices)[:k])


class DeviceImpairment:
    """Drift and sensor faults of one device; see the module docstring."""

    def __init__(self, scenario: Scenario, device_index: int, n_channels: int, rate_hz: float,
                 seed: Seed):
        if not 0 <= device_index < scenario.devices:
            raise ConfigError(f"device_index={device_index}: expected 0..{scenario.devices - 1}")
        if not rate_hz > 0:
            raise ConfigError(f"rate_hz={rate_hz!r}: expected a sample rate > 0")
        self.n_channels, self.rate_hz = n_channels, float(rate_hz)
        self.drift = scenario.drift
        masks, faults = [], []
        for i, fault in enumerate(scenario.faults):
            bad = [c for c in fault.channels if not 0 <= c < n_channels]
            if bad:
                raise ConfigError(f"faults[{i}].channels={list(fault.channels)}: channel(s) {bad} "
                                  f"out of range for {n_channels} channels")
            if device_index in fault_devices(scenario, i):
                mask = np.zeros(n_channels, bool)
                mask[list(fault.channels) or slice(None)] = True
                faults.append(fault)
                masks.append(mask)
        self.faults: tuple[SensorFault, ...] = tuple(faults)  # the faults hitting this device
        self._masks = masks
        drift_seed, noise_seed = _seq(seed).spawn(2)
        r = np.random.default_rng(drift_seed)
        self._gain_scale = r.uniform(0.5, 1.0, n_channels)  # (C,)
        self._offset_scale = r.uniform(0.5, 1.0, n_channels)  # (C,)
        self._rng = np.random.default_rng(noise_seed)
        self._bias = np.zeros(n_channels)  # (C,) the random walk's current value
        self._last: np.ndarray | None = None  # (C,) the last sample reported
        self._stuck: dict[int, np.ndarray] = {}  # fault index -> frozen value (C,)

    def silent(self, t_s: float) -> bool:
        """True while a dropout fault of this device is active at stream time `t_s`."""
        return any(f.kind == "dropout" and f.start_s <= t_s < f.start_s + f.duration_s
                   for f in self.faults)

    def apply(self, values: np.ndarray, t0_s: float) -> np.ndarray:
        """The impaired copy of `values` (n, C), whose first sample is at stream time `t0_s`.

        Call it in stream order: the bias walk and stuck values carry over between calls.
        """
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[1] != self.n_channels:
            raise ValueError(f"Invalid values shape {values.shape}: expected (n, {self.n_channels})")
        n = values.shape[0]
        t = t0_s + np.arange(n) / self.rate_hz  # (n,) stream time of each sample
        h = t[:, None] / 3600.0  # (n, 1) hours
        d = self.drift
        out = values.astype(np.float64)  # (n, C)
        if d.gain_per_h:
            out *= 1.0 + d.gain_per_h * h * self._gain_scale
        if d.offset_per_h:
            out += d.offset_per_h * h * self._offset_scale
        # One row of normals per sample (noise, then walk steps), so that how the stream is
        # cut into calls does not change it.
        k = bool(d.noise_growth_per_h) + bool(d.bias_walk)
        z = self._rng.standard_normal((n, k * self.n_channels)) if k else None  # (n, k*C)
        if d.noise_growth_per_h:
            out += z[:, :self.n_channels] * (d.noise_growth_per_h * h)
        if d.bias_walk and n:
            walk = self._bias + np.cumsum(z[:, -self.n_channels:] * d.bias_walk, 0)  # (n, C)
            out += walk
            self._bias = walk[-1]
        for i, (fault, mask) in enumerate(zip(self.faults, self._masks, strict=True)):
            active = (t >= fault.start_s) & (t < fault.start_s + fault.duration_s)  # (n,)
            if fault.kind == "dropout" or not active.any():
                continue
            if fault.kind == "saturation":
                rows = out[active]
                rows[:, mask] = np.clip(rows[:, mask], -fault.level, fault.level)
                out[active] = rows
            else:  # stuck: freeze the last value reported before the fault
                if i not in self._stuck:
                    j = int(np.argmax(active))
                    before = out[j - 1] if j else self._last
                    self._stuck[i] = (out[j] if before is None else before).copy()
                out[np.ix_(active, mask)] = self._stuck[i][mask]
        if n:
            self._last = out[-1].copy()
        return out.astype(np.float32)


@dataclass
class ShaperStats:
    offered: int = 0  # frames given to `shape`
    sent: int = 0  # payloads returned (duplicates, released and malformed included)
    lost_disconnected: int = 0
    lost_burst: int = 0
    duplicated: int = 0
    reordered: int = 0  # held back
    malformed: int = 0  # replaced by a broken payload


class NetworkShaper:
    """Network faults of one device; see the module docstring."""

    def __init__(self, network: Network, seed: Seed):
        self.network = network
        decide_seed, garbage_seed = _seq(seed).spawn(2)
        self._rng = np.random.default_rng(decide_seed)
        self._garbage = np.random.default_rng(garbage_seed)
        self._burst_left = 0
        self._held: list[list] = []  # [payload, later frames still to wait for]
        self.stats = ShaperStats()

    @property
    def held(self) -> int:
        return len(self._held)

    def connected(self, t_s: float) -> bool:
        return not any(s <= t_s < s + d for s, d in self.network.disconnects)

    def shape(self, seq: int, payload: bytes, t_s: float) -> list[bytes]:
        """The payloads to publish now for frame `seq` at stream time `t_s` (0..n, in order)."""
        net, st = self.network, self.stats
        u_burst, u_bad, u_hold, u_dup = self._rng.random(4)
        st.offered += 1
        if not self.connected(t_s):
            st.lost_disconnected += 1
            return []
        for h in self._held:
            h[1] -= 1
        released = [p for p, left in self._held if left <= 0]
        self._held = [h for h in self._held if h[1] > 0]
        out: list[bytes] = []
        if self._burst_left > 0 or u_burst < net.burst_prob:
            self._burst_left = (self._burst_left or net.burst_len) - 1
            st.lost_burst += 1
        else:
            frame = payload
            if u_bad < net.malformed_prob:
                frame = self.malformed(payload)
                st.malformed += 1
            if u_hold < net.reorder_prob:
                self._held.append([frame, net.reorder_depth])
                st.reordered += 1
            else:
                out.append(frame)
                if u_dup < net.duplicate_prob:
                    out.append(frame)
                    st.duplicated += 1
        out += released
        st.sent += len(out)
        return out

    def flush(self) -> list[bytes]:
        """Release every held frame (at the end of a run): reordering loses nothing."""
        out = [p for p, _ in self._held]
        self._held = []
        self.stats.sent += len(out)
        return out

    def malformed(self, payload: bytes) -> bytes:
        """A realistic broken version of `payload` (one of MALFORMED_KINDS, seeded)."""
        kind = MALFORMED_KINDS[int(self._garbage.integers(len(MALFORMED_KINDS)))]
        try:
            frame = decode_frame(payload)
        except ProtocolError:  # not a frame to begin with: cut it short
            return payload[: int(self._garbage.integers(0, max(1, len(payload))))]
        binary = payload[:2] == BINARY_MAGIC
        if kind == "truncated":
            return payload[: int(self._garbage.integers(1, len(payload)))]
        if kind == "bad_json":
            text = encode_frame_json(frame.seq, frame.ts, frame.values)
            return text[: -int(self._garbage.integers(1, min(len(text), 12)))]
        if kind == "nan_json":
            rows = frame.values.astype(float).tolist()
            s, c = (int(self._garbage.integers(k)) for k in frame.values.shape)
            rows[s][c] = float("nan")
            return json.dumps({"seq": frame.seq, "ts": frame.ts, "values": rows},
                              separators=(",", ":"), allow_nan=True).encode()
        values = frame.values  # wrong_channels: one channel too few (or too many)
        values = values[:, :-1] if frame.n_channels > 1 else np.hstack([values, values])
        encode = encode_frame_binary if binary else encode_frame_json
        return encode(frame.seq, frame.ts, values)


class Oracle:
    """The label oracle of one device; see `LabelOracle` and the module docstring.

    Label ids are ``{device}-{run}-{n}``: ``run`` is derived from the seed (so another seed
    does not collide with the agent's deduplication of earlier runs) and ``n`` counts labels.
    """

    def __init__(self, spec: LabelOracle, seed: Seed):
        self.spec = spec
        ss = _seq(seed)
        self._run = f"{int(ss.generate_state(1)[0]):08x}"
        self._rng = np.random.default_rng(ss)
        self._n = 0
        self.labelled = self.flipped = self.too_short = 0

    def segment(self, device: str, cls: str, start_ts: float, end_ts: float,
                classes: Sequence[str]) -> dict | None:
        """Called when a class segment of `device` ends: ``{"due_s", "payload"}`` or None.

        ``due_s`` is on the clock of `end_ts` (the segment end plus the delay).
        """
        spec = self.spec
        u_label, u_flip, u_other, u_delay = self._rng.random(4)
        if end_ts - start_ts < spec.min_segment_s:
            self.too_short += 1
            return None
        if u_label >= spec.fraction:
            return None
        label = cls
        others = [c for c in classes if c != cls]
        if others and u_flip < spec.noise:
            label = others[min(int(u_other * len(others)), len(others) - 1)]
            self.flipped += 1
        delay = max(0.0, spec.delay_s + (2 * u_delay - 1) * spec.delay_jitter_s)
        self._n += 1
        self.labelled += 1
        return {"due_s": end_ts + delay,
                "payload": {"id": f"{device}-{self._run}-{self._n}", "label": label,
                            "from_ts": start_ts, "to_ts": end_ts}}
