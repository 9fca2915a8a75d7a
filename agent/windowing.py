"""Per-device sliding windows over the sample stream, with bounded frame reordering.

Frames arrive as ``(n_samples, n_channels)`` blocks with a sequence number. The buffer
cuts windows of ``window`` samples every ``hop`` samples and remembers which frame each
sample came from, so a prediction can name the frames it covers. A window never spans a
missing frame: it would mislead the model.

Sequence rules (``expected`` = last consumed seq + 1):

* **in order** (``seq == expected``): consumed at once. This is the hot path: one dict
  check, a few array copies, no per-sample Python loop.
* **ahead** (``seq > expected``): held, up to ``reorder_frames`` frames. When the missing
  frame arrives, it and the held frames that now follow on are consumed in order; each held
  frame that a lower seq overtook counts once as ``reordered``. When one more than
  ``reorder_frames`` frames would be held, the missing seqs before the lowest held one are
  declared lost: one ``gap`` per contiguous missing run, ``lost_frames`` += the run length,
  the partial window is discarded, and the stream continues from the held frames.
  ``reorder_frames=0`` is the strict behaviour: any jump is a gap at once.
* **duplicate**: a seq already consumed, already held, or already declared lost (a frame
  later than the reorder budget allows) is counted and dropped.
* **restart**: a seq far below the last consumed one (``top``) -- ``seq < top -
  RESTART_BACKSTEP``, or ``seq == 0`` once ``top >= RESTART_ZERO_AFTER`` -- means the
  device rebooted (or its counter wrapped) and counts again. Without this rule a rebooted
  device would be ignored until it passed its old seq. The held frames are flushed
  (consumed, gaps declared as above), the partial window is discarded, and the frame
  starts a new stream. The price: a stale copy of seq 0 redelivered late also reads as a
  restart.
* **restart, by time**: a lower seq whose ``ts`` does not fit the stream's time line is a
  restart too, however small the old seq was. A stale copy of frame ``s`` carries frame
  ``s``'s own timestamp: about ``last_ts - (top - s) * period`` (``period``: the stream's
  seconds per frame so far). A simulator or device started again a few seconds later
  sends seq 0, 1, ... with new timestamps: more than ``RESTART_TS_SLACK_S`` off that line
  (or after ``last_ts``), so its frames are taken at once instead of being dropped as
  duplicates until its seq passed the old one (issue 17: a re-run `reverie sim` lost up
  to 67 frames, a 6-8 s one all of them). Streams whose ``ts`` does not advance (all 0)
  keep the seq rules alone.
* **first frame** (and the first after a restart) starts the stream whatever its seq, so
  windows flow at once after an agent restart; a lower seq arriving after it is a
  duplicate.

Window indices continue across gaps and restarts and can start at ``start_index``: labels
refer to windows by index, so a restarted agent must not reuse them. Invariant: frames
pushed == ``frames`` (consumed) + ``duplicates`` + ``held()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from agent.protocol import MAX_SAMPLES

RESTART_BACKSTEP = 1000     # a seq this far below the highest seen is a device restart
RESTART_ZERO_AFTER = 32     # seq 0 after a seq this high is a device restart, not a duplicate
RESTART_TS_SLACK_S = 1.0    # a lower seq this far off the stream's time line is a restart


@dataclass(frozen=True)
class Window:
    index: int           # per-device window counter, from start_index
    values: np.ndarray   # (C, T) float32, channels first, as the model takes it
    seq_first: int       # seq of the frame holding the first sample
    seq_last: int        # seq of the frame holding the last sample
    ts: float            # timestamp of the frame holding the first sample


@dataclass
class WindowCounters:
    frames: int = 0        # frames consumed (held frames are not counted until released)
    duplicates: int = 0    # dropped: seq already consumed, held or declared lost
    gaps: int = 0          # contiguous runs of missing seqs declared lost
    windows: int = 0       # windows produced
    reordered: int = 0     # held frames that a lower seq overtook
    lost_frames: int = 0   # missing seqs declared lost
    restarts: int = 0      # the device started counting again

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class WindowBuffer:
    """Sliding windows for one device (sequence rules in the module docstring).

    >>> wb = WindowBuffer(n_channels=2, window=4, hop=2)
    >>> [w.index for w in wb.push(0, 0.0, np.zeros((6, 2), "f4"))]
    [0, 1]
    >>> wb.push(2, 0.0, np.zeros((2, 2), "f4")), wb.held()   # seq 1 is missing: held
    ([], 1)
    >>> [(w.seq_first, w.seq_last) for w in wb.push(1, 0.0, np.zeros((2, 2), "f4"))]
    [(0, 1), (1, 2)]
    """

    def __init__(self, *, n_channels: int, window: int, hop: int,
                 max_frame_samples: int = MAX_SAMPLES, reorder_frames: int = 4,
                 start_index: int = 0):
        if window < 1 or hop < 1:
            raise ValueError(f"window={window}, hop={hop}: expected window >= 1 and hop >= 1")
        if reorder_frames < 0:
            raise ValueError(f"reorder_frames={reorder_frames}: expected >= 0")
        if start_index < 0:
            raise ValueError(f"start_index={start_index}: expected >= 0")
        self.n_channels = n_channels
        self.window = window
        self.hop = hop
        self.reorder_frames = reorder_frames
        cap = window + max_frame_samples
        self._buf = np.zeros((cap, n_channels), dtype=np.float32)   # (cap, C)
        self._seq = np.zeros(cap, dtype=np.uint64)                  # frame seq per sample
        self._ts = np.zeros(cap, dtype=np.float64)                  # frame ts per sample
        self._n = 0
        self._skip = 0  # samples still to discard after a hop larger than the window
        self._next_index = start_index
        self._expected: int | None = None   # next seq to consume; None before the first frame
        self._held: dict[int, tuple[float, np.ndarray]] = {}   # seq -> (ts, (S, C) values)
        self._overtaken: set[int] = set()   # held seqs that a lower seq arrived after
        self._origin: tuple[int, float] | None = None   # (seq, ts) of the stream's first frame
        self._last_ts = 0.0                             # ts of the last consumed frame
        self.counters = WindowCounters()

    @property
    def next_index(self) -> int:
        """Index the next window will get."""
        return self._next_index

    @property
    def last_seq(self) -> int | None:
        """Seq of the last consumed frame (None before the first)."""
        return None if self._expected is None else self._expected - 1

    def held(self) -> int:
        """Number of frames held while waiting for a missing one."""
        return len(self._held)

    def advance_index(self, index: int) -> None:
        """Number the next windows from at least ``index`` (never backwards: ids must not
        repeat)."""
        if index < 0:
            raise ValueError(f"index={index}: expected >= 0")
        self._next_index = max(self._next_index, index)

    def push(self, seq: int, ts: float, values: np.ndarray) -> list[Window]:
        """Offer one frame's samples ``(S, C)``; return the windows it completes (possibly
        including windows of held frames it releases). ``values`` is copied if held."""
        if values.ndim != 2 or values.shape[1] != self.n_channels:
            raise ValueError(
                f"frame has shape {values.shape}, expected (samples, {self.n_channels})")
        if values.shape[0] > self._buf.shape[0] - self.window:
            raise ValueError(f"frame of {values.shape[0]} samples exceeds the buffer")
        out: list[Window] = []
        if seq == self._expected and not self._held:
            self._consume(seq, ts, values, out)
            return out

        exp = self._expected
        if exp is not None:
            top = exp - 1   # held frames do not count: one far ahead is no reference
            if seq < top - RESTART_BACKSTEP or (seq == 0 and top >= RESTART_ZERO_AFTER) or (
                    seq < exp and self._off_time_line(seq, ts, top)):
                self.counters.restarts += 1
                while self._held:
                    self._declare_lost(out)
                self._n = self._skip = 0
                exp = self._expected = None
                self._origin = None
            elif seq < exp or seq in self._held:
                self.counters.duplicates += 1
                return out
        if exp is None:
            self._consume(seq, ts, values, out)
            return out

        if self._held:
            self._overtaken.update(s for s in self._held if s > seq)
        if seq == exp:
            self._consume(seq, ts, values, out)
            self._release(out)
        else:
            self._held[seq] = (ts, values.copy())
            if len(self._held) > self.reorder_frames:
                self._declare_lost(out)
        return out

    def _off_time_line(self, seq: int, ts: float, top: int) -> bool:
        """Is `ts` not what frame `seq` of this stream carried? (restart by time)"""
        if ts > self._last_ts + RESTART_TS_SLACK_S:
            return True
        first_seq, first_ts = self._origin
        if top <= first_seq:
            return False
        period = (self._last_ts - first_ts) / (top - first_seq)
        return abs(ts - (self._last_ts - (top - seq) * period)) > RESTART_TS_SLACK_S

    def _release(self, out: list[Window]) -> None:
        """Consume the held frames that follow on from the expected seq."""
        held = self._held
        while self._expected in held:
            seq = self._expected
            ts, values = held.pop(seq)
            if seq in self._overtaken:
                self._overtaken.discard(seq)
                self.counters.reordered += 1
            self._consume(seq, ts, values, out)

    def _declare_lost(self, out: list[Window]) -> None:
        """Give up on the missing run before the lowest held seq and continue from it."""
        assert self._expected is not None
        first = min(self._held)
        self.counters.gaps += 1
        self.counters.lost_frames += first - self._expected
        self._n = self._skip = 0
        self._expected = first
        self._release(out)

    def _consume(self, seq: int, ts: float, values: np.ndarray, out: list[Window]) -> None:
        if self._origin is None:
            self._origin = (seq, ts)
        self._last_ts = ts
        self._expected = seq + 1
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

        made = 0
        while self._n >= self.window:
            w = self.window
            out.append(Window(self._next_index, self._buf[:w].T.copy(),
                              int(self._seq[0]), int(self._seq[w - 1]), float(self._ts[0])))
            self._next_index += 1
            made += 1
            step = min(self.hop, self._n)
            self._skip = self.hop - step
            rest = self._n - step
            self._buf[:rest] = self._buf[step:self._n]
            self._seq[:rest] = self._seq[step:self._n]
            self._ts[:rest] = self._ts[step:self._n]
            self._n = rest
        self.counters.windows += made


@dataclass
class DeviceWindows:
    """A WindowBuffer per device, created on first use (gateway mode serves many).

    ``start_indices`` (device -> first window index) lets a restarted agent continue each
    device's window numbering; ``next_indices()`` is what to persist for that.
    """

    n_channels: int
    window: int
    hop: int
    max_devices: int = 10_000
    buffers: dict[str, WindowBuffer] = field(default_factory=dict)
    reorder_frames: int = 4
    start_indices: dict[str, int] = field(default_factory=dict)
    default_start: int = 0       # first index of a device without a start index

    def get(self, device: str) -> WindowBuffer:
        wb = self.buffers.get(device)
        if wb is None:
            if len(self.buffers) >= self.max_devices:
                raise OverflowError(f"more than max_devices={self.max_devices} devices")
            wb = self.buffers[device] = WindowBuffer(
                n_channels=self.n_channels, window=self.window, hop=self.hop,
                reorder_frames=self.reorder_frames,
                start_index=self.start_indices.get(device, self.default_start))
        return wb

    def set_start_index(self, device: str, index: int) -> None:
        """Number ``device``'s windows from at least ``index`` (also if it already has a
        buffer; numbering never goes backwards)."""
        if index < 0:
            raise ValueError(f"start index {index} for device {device!r}: expected >= 0")
        self.start_indices[device] = index
        wb = self.buffers.get(device)
        if wb is not None:
            wb.advance_index(index)

    def next_index(self, device: str) -> int:
        """Index ``device``'s next window will get."""
        wb = self.buffers.get(device)
        return wb.next_index if wb is not None else self.start_indices.get(device,
                                                                           self.default_start)

    def next_indices(self) -> dict[str, int]:
        """``next_index`` of every device seen or given a start index."""
        return {**self.start_indices, **{d: wb.next_index for d, wb in self.buffers.items()}}

    def totals(self) -> dict[str, int]:
        """Counters summed over devices, plus ``held`` frames and ``devices``."""
        total = WindowCounters().as_dict()
        held = 0
        buffers = list(self.buffers.values())   # other threads read while the worker adds
        for wb in buffers:
            for k, v in wb.counters.as_dict().items():
                total[k] += v
            held += wb.held()
        return {**total, "held": held, "devices": len(buffers)}
