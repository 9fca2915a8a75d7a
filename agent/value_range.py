"""The range of sample values the agent accepts, per channel.

A finite value can still be hostile: a frame of +-3e38 passes every type check, and the
encoder turns it into NaN/Inf latents. Values are therefore bounded before anything
buffers them: per channel ``|x - mean| <= k * std`` with the bundle's training statistics
(manifest ``normalization``, ``per = "channel"`` or one global mean/std) and ``k =
ingest.value_range_k`` (default 1000: sensor data that far from anything seen in training
is a fault or an attack, not a reading), and always ``|x| <= ingest.max_abs_value``
(default 1e6), the bound used alone when the bundle records no statistics.

>>> r = ValueRange.from_manifest({"normalization": {"mean": [0.0], "std": [1.0]}}, 1,
...                              k=10, max_abs=1e6)
>>> r.check(np.array([[3.0], [-9.5]], np.float32), "frame seq=1")
>>> r.check(np.array([[0.0], [12.0]], np.float32), "frame seq=2")
Traceback (most recent call last):
...
agent.errors.ProtocolError: frame seq=2: values[1][0]=12 is outside the accepted range [-10, 10] of channel 0 (mean 0 +- 10 x std 1; ingest.value_range_k)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import ProtocolError

log = logging.getLogger("reverie.ingest")


@dataclass(frozen=True)
class ValueRange:
    """Per-channel bounds ``lo <= x <= hi`` (float64 arrays of n_channels)."""

    lo: np.ndarray        # (C,)
    hi: np.ndarray        # (C,)
    why: tuple[str, ...]  # per channel: where its bound comes from (for error messages)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], n_channels: int, *, k: float,
                      max_abs: float) -> ValueRange:
        """Bounds from the manifest's ``normalization`` (when usable) and `max_abs`."""
        lo = np.full(n_channels, -max_abs, np.float64)
        hi = np.full(n_channels, max_abs, np.float64)
        why = [f"|x| <= {max_abs:g}; ingest.max_abs_value"] * n_channels
        stats = _stats(manifest.get("normalization"), n_channels)
        if stats is None:
            log.info("the bundle records no usable normalization statistics: sample values "
                     "are bounded by ingest.max_abs_value=%g only", max_abs)
        else:
            mean, std = stats
            for c in range(n_channels):
                a, b = mean[c] - k * std[c], mean[c] + k * std[c]
                if a > lo[c] or b < hi[c]:
                    lo[c], hi[c] = max(a, lo[c]), min(b, hi[c])
                    why[c] = (f"mean {mean[c]:.6g} +- {k:g} x std {std[c]:.6g}; "
                              "ingest.value_range_k")
        return cls(lo, hi, tuple(why))

    def check(self, values: np.ndarray, what: str) -> None:
        """Raise ProtocolError("out_of_range") naming the first value outside the range.

        `values` is (samples, channels), already finite."""
        bad = (values < self.lo) | (values > self.hi)            # (T, C)
        if not bad.any():
            return
        i, c = (int(v) for v in np.argwhere(bad)[0])
        raise ProtocolError("out_of_range", f"{what}: values[{i}][{c}]={float(values[i, c]):.6g} "
                            f"is outside the accepted range [{self.lo[c]:.6g}, {self.hi[c]:.6g}] "
                            f"of channel {c} ({self.why[c]})")


def _stats(norm: Any, n_channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) per channel from a manifest ``normalization`` section, or None."""
    if not isinstance(norm, dict):
        return None
    mean, std = norm.get("mean"), norm.get("std")
    try:
        mean = np.atleast_1d(np.asarray(mean, np.float64))
        std = np.atleast_1d(np.asarray(std, np.float64))
    except (TypeError, ValueError):
        return None
    if mean.ndim != 1 or std.ndim != 1:
        return None
    if mean.shape == (1,) and std.shape == (1,):           # one global mean/std
        mean, std = np.repeat(mean, n_channels), np.repeat(std, n_channels)
    if mean.shape != (n_channels,) or std.shape != (n_channels,):
        return None
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        return None
    return mean, std
