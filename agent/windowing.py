"""Per-device sliding windows over the sample stream.

Frames arrive as ``(n_samples, n_channels)`` blocks with a sequence number. The buffer
cuts windows of ``window`` samples every ``hop`` samples and remembers which frame each
sample came from, so a prediction can name the frames it covers. A duplicate or stale
frame (seq not above the last one) is dropped; a gap (seq jumps) is counted and the
partial window is discarded, since a window spanning missing samples would mislead the
model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agent.protocol import MAX_SAMPLES


@dataclass(frozen=True)
class Window:
    index: int           # per-device window counter, from 0
    values: np.ndarray   # (C, T) float32, channels first, as the model takes it
    seq_first: int       # seq of the frame holding the first sample
    seq_last: int        # seq of the frame holding the last sample
    ts: float            # timestamp of the frame holding the first sample


@dataclass
class WindowCounters:
    frames: int = 0
    duplicates: int = 0
    gaps: int = 0
    windows: int = 0


class WindowBuffer:
    """Sliding windows for one device.

    >>> wb = WindowBuffer(n_channels=2, window=4, hop=2)
    >>> [w.index for w in wb.push(0, 0.0, np.zeros((6, 2), "f4"))]
    [0, 1]
    """

    def __init__(self, *, n_channels: int, window: int, hop: int, max_frame_samples: int = MAX_SAMPLES):
        if window < 1 or hop < 1:
            raise ValueError(f"window={window}, hop={hop}: expected window >= 1 and hop >= 1")
        self.n_channels = n_channels
        self.window = window
        self.hop = hop
        cap = window + max_frame_samples
        self._buf = np.zeros((cap, n_channels), dtype=np.float32)   # (cap, C)
        self._seq = np.zeros(cap, dtype=np.int64)                   # frame seq per sample
        self._ts = np.zeros(cap, dtype=np.float64)                  # frame ts per sample
        self._n = 0
        self._last_seq: int | None = None
        self._next_index = 0
        self.counters = WindowCounters()
        self._skip = 0  # samples still to discard after a hop larger than the window

    def push(self, seq: int, ts: float, values: np.ndarray) -> list[Window]:
        """Append one frame's samples ``(S, C)``; return the windows it completes."""
        if values.ndim != 2 or values.shape[1] != self.n_channels:
            raise ValueError(
                f"frame has shape {values.shape}, expected (samples, {self.n_channels})")
        if values.shape[0] > self._buf.shape[0] - self.window:
            raise ValueError(f"frame of {values.shape[0]} samples exceeds the buffer")
        if self._last_seq is not None:
            if seq <= self._last_seq:
                self.counters.duplicates += 1
                return []
            if seq != self._last_seq + 1:
                self.counters.gaps += 1
                self._n = 0
                self._skip = 0
        self._last_seq = seq
        self.counters.frames += 1

        if self._skip:
            drop = min(self._skip, values.shape[0])
            values = values[drop:]
            self._skip -= drop
        s = values.shape[0]
        self._buf[self._n:self._n + s] = values
        self._seq[self._n:self._n + s] = seq
        self._ts[self._n:self._n + s] = ts
        self._n += s

        out: list[Window] = []
        while self._n >= self.window:
            w = self.window
            out.append(Window(self._next_index, self._buf[:w].T.copy(),
                              int(self._seq[0]), int(self._seq[w - 1]), float(self._ts[0])))
            self._next_index += 1
            step = min(self.hop, self._n)
            self._skip = self.hop - step
            rest = self._n - step
            self._buf[:rest] = self._buf[step:self._n]
            self._seq[:rest] = self._seq[step:self._n]
            self._ts[:rest] = self._ts[step:self._n]
            self._n = rest
        self.counters.windows += len(out)
        return out


@dataclass
class DeviceWindows:
    """A WindowBuffer per device, created on first use (gateway mode serves many)."""

    n_channels: int
    window: int
    hop: int
    max_devices: int = 10_000
    buffers: dict[str, WindowBuffer] = field(default_factory=dict)

    def get(self, device: str) -> WindowBuffer:
        wb = self.buffers.get(device)
        if wb is None:
            if len(self.buffers) >= self.max_devices:
                raise OverflowError(f"more than max_devices={self.max_devices} devices")
            wb = self.buffers[device] = WindowBuffer(
                n_channels=self.n_channels, window=self.window, hop=self.hop)
        return wb
