"""Recent windows per device, kept so that a label arriving later can name them.

Labels arrive after the fact (a person or another system says "windows 41-43 were a
wave"), sometimes while the agent was down. The daemon keeps, per device, the last
``capacity`` windows as *latents* (the frozen encoder's output, 4-16x smaller than the
raw window and all the learner needs) with their window id and timestamp, in a ring.
`save` writes them atomically to the state directory (periodically and on shutdown) and
`load` brings them back after a restart, so labels published while the agent was stopped
still find their windows. A history saved under another bundle is ignored: its latents
belong to another encoder.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.persist.fsio import replace_atomically

log = logging.getLogger("reverie.history")
FORMAT = 1


@dataclass
class _Ring:
    latents: np.ndarray   # (cap, d) float32
    index: np.ndarray     # (cap,) int64 window id, -1 empty
    ts: np.ndarray        # (cap,) float64
    head: int = 0         # next slot to write

    @classmethod
    def empty(cls, capacity: int, dim: int) -> _Ring:
        return cls(np.zeros((capacity, dim), np.float32), np.full(capacity, -1, np.int64),
                   np.zeros(capacity, np.float64))


class WindowHistory:
    """Per-device rings of (window id, ts, latent).

    >>> h = WindowHistory(capacity=4, dim=2)
    >>> h.add("d", np.array([7]), np.array([1.0]), np.ones((1, 2), "f4"))
    >>> h.by_ids("d", [7, 8])[0].tolist(), h.by_ids("d", [7, 8])[2]
    ([7], [8])
    """

    def __init__(self, capacity: int, dim: int):
        if capacity < 1 or dim < 1:
            raise ValueError(f"capacity={capacity}, dim={dim}: expected >= 1")
        self.capacity = capacity
        self.dim = dim
        self._rings: dict[str, _Ring] = {}
        self.clean = True      # loaded: the file was written by a clean shutdown
        self.dirty = False     # windows added since the last save
        self.wal_seq = 0       # loaded: the last history log record the file contains
        # A list: every `add` also appends a copy (device, ids, ts, latents) here, for
        # agent.history_store to log incrementally; None: not journaled.
        self.journal: list | None = None

    def __len__(self) -> int:
        return sum(int((r.index >= 0).sum()) for r in self._rings.values())

    def devices(self) -> list[str]:
        return list(self._rings)

    def add(self, device: str, index: np.ndarray, ts: np.ndarray, latents: np.ndarray) -> None:
        """Append windows of one device (ids increasing)."""
        r = self._rings.get(device)
        if r is None:
            r = self._rings[device] = _Ring.empty(self.capacity, self.dim)
        n = len(index)
        if n > self.capacity:
            index, ts, latents = index[-self.capacity:], ts[-self.capacity:], latents[-self.capacity:]
            n = self.capacity
        slots = (r.head + np.arange(n)) % self.capacity
        r.latents[slots] = latents
        r.index[slots] = index
        r.ts[slots] = ts
        r.head = int((r.head + n) % self.capacity)
        self.dirty = True
        if self.journal is not None:
            self.journal.append((device, np.array(index, np.int64), np.array(ts, np.float64),
                                 np.array(latents, np.float32)))

    def last_index(self, device: str) -> int:
        """The newest window id held for `device`, -1 if none."""
        r = self._rings.get(device)
        return -1 if r is None else int(r.index.max())

    def by_ids(self, device: str, ids, *, with_ts: bool = False) -> tuple:
        """``(found ids, latents, missing ids)`` for the requested window ids; with
        ``with_ts`` also the found windows' timestamps."""
        ids = [int(i) for i in ids]
        r = self._rings.get(device)
        if r is None:
            empty = (np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32), ids)
            return (*empty, np.zeros(0)) if with_ts else empty
        pos = {int(w): s for s, w in enumerate(r.index.tolist()) if w >= 0}
        found = [i for i in ids if i in pos]
        slots = np.array([pos[i] for i in found], dtype=np.int64)
        missing = [i for i in ids if i not in pos]
        out = (np.array(found, np.int64), r.latents[slots].copy(), missing)
        return (*out, r.ts[slots].copy()) if with_ts else out

    def by_time(self, device: str, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, ts, latents)`` of the windows whose timestamp is in [lo, hi], by id."""
        r = self._rings.get(device)
        if r is None:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros((0, self.dim), np.float32)
        sel = np.flatnonzero((r.index >= 0) & (r.ts >= lo) & (r.ts <= hi))
        sel = sel[np.argsort(r.index[sel])]
        return r.index[sel].copy(), r.ts[sel].copy(), r.latents[sel].copy()

    def time_span(self, device: str) -> tuple[float, float] | None:
        r = self._rings.get(device)
        if r is None or not (r.index >= 0).any():
            return None
        held = r.ts[r.index >= 0]
        return float(held.min()), float(held.max())

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path, bundle_id: str, *, clean: bool = False) -> None:
        """Write every ring to `path` atomically (npz, no pickle). ``clean``: written by a
        clean shutdown, so no window id was handed out after it."""
        write_snapshot(path, self.snapshot(bundle_id, clean=clean))

    def snapshot(self, bundle_id: str, *, clean: bool = False) -> dict[str, np.ndarray]:
        """Copies of the rings (cheap: a few memcpy), to be written by `write_snapshot`
        on another thread, so the owner of the history never waits for the disk."""
        arrays: dict[str, np.ndarray] = {
            "format": np.array(FORMAT), "bundle_id": np.array(bundle_id),
            "clean": np.array(bool(clean)),
            "devices": np.array(list(self._rings), dtype=np.str_)}
        for i, r in enumerate(self._rings.values()):
            order = (r.head + np.arange(self.capacity)) % self.capacity   # oldest first
            keep = order[r.index[order] >= 0]
            arrays[f"lat_{i}"] = r.latents[keep]
            arrays[f"idx_{i}"] = r.index[keep]
            arrays[f"ts_{i}"] = r.ts[keep]
        self.dirty = False
        return arrays

    @classmethod
    def load(cls, path: str | Path, bundle_id: str, capacity: int, dim: int) -> WindowHistory:
        """Rings from `path`; an empty history (with a warning) if the file is missing,
        unreadable or from another bundle. Never raises for a bad file."""
        h = cls(capacity, dim)
        path = Path(path)
        if not path.exists():
            return h
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["format"]) != FORMAT or str(z["bundle_id"]) != bundle_id:
                    log.warning("%s: window history of bundle %s (format %s) ignored", path,
                                str(z["bundle_id"]), int(z["format"]))
                    return h
                for i, device in enumerate(z["devices"].tolist()):
                    lat, idx, ts = z[f"lat_{i}"], z[f"idx_{i}"], z[f"ts_{i}"]
                    if lat.ndim != 2 or lat.shape[1] != dim or not len(lat) == len(idx) == len(ts):
                        raise ValueError(f"device {device}: latents {lat.shape}, dim {dim}")
                    h.add(str(device), idx.astype(np.int64), ts.astype(np.float64),
                          lat.astype(np.float32))
                h.clean = bool(z["clean"]) if "clean" in z.files else False
                h.wal_seq = int(z["wal_seq"]) if "wal_seq" in z.files else 0
                h.dirty = False
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            log.warning("%s: unreadable window history ignored (%s); labels for windows "
                        "before the restart will be reported unknown", path, exc)
            return cls(capacity, dim)
        return h


def write_snapshot(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write what `WindowHistory.snapshot` returned to `path`, atomically (fsynced)."""
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    replace_atomically(Path(path), buf.getvalue())
