"""`HistoryStore`: the recent-window history on disk, incrementally (issue 13, finding 8).

Rewriting the whole history (``windows.npz``: 42 MB at 150 devices) every 10 s wrote
~2.4 GB a day even for one device. Instead::

    STATE/windows.npz            a compacted snapshot of every ring, with the last log
                                 record it contains ("wal_seq") and a "clean" flag
    STATE/history/wal-*.log      the windows added since: one CRC-framed record per device
                                 and hand-off (agent/persist/wal.py), appended without fsync,
                                 one fsync per flush

The worker only copies new windows into a journal (`WindowHistory.journal`); every
``HISTORY_SAVE_S`` it hands the journal over and the main thread appends and fsyncs it.
When the log has grown past the snapshot (and 1 MiB), the hand-off carries a copy of the
rings, written as the new snapshot, and the log before it is deleted. A clean stop
writes a snapshot with ``clean=True``; at start a durable "open" record makes any later
crash visible (records after the snapshot = an unclean stop: window ids jump).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from agent.errors import ReverieError, StateError
from agent.history import WindowHistory, write_snapshot
from agent.persist.wal import WriteAheadLog
from agent.persist.wal_format import decode_record, encode_record

log = logging.getLogger("reverie.history")
SNAPSHOT_FILE = "windows.npz"
LOG_DIR = "history"
MIN_COMPACT_BYTES = 1 << 20


class HistoryStore:
    """Loads and persists the `WindowHistory` of one state directory."""

    def __init__(self, state_dir: Path, bundle_id: str):
        self.snapshot_path = state_dir / SNAPSHOT_FILE
        self.bundle_id = bundle_id
        self.wal = WriteAheadLog(state_dir / LOG_DIR)
        self.log_bytes = 0              # appended since the last snapshot
        self.snapshot_bytes = 0
        self._handed: list[tuple[list, dict | None]] = []   # worker -> writer
        self._slot = threading.Lock()   # guards _handed
        self._write = threading.Lock()  # one writer at a time (main loop, snapshot command)

    # -- start-up ----------------------------------------------------------------------

    def load(self, capacity: int, dim: int) -> WindowHistory:
        """The snapshot plus the log after it; ``clean`` only if nothing followed a
        clean stop's snapshot. Never raises for bad files (they are reported)."""
        h = WindowHistory.load(self.snapshot_path, self.bundle_id, capacity, dim)
        covered = h.wal_seq
        try:
            self.snapshot_bytes = self.snapshot_path.stat().st_size
        except OSError:
            self.snapshot_bytes = 0
        records, warnings = self.wal.recover(covered)
        for w in warnings:
            log.warning("window history log: %s", w)
        applied = 0
        for seq, payload in records:
            try:
                meta, arrays = decode_record(payload)
                if meta.get("open"):
                    continue
                if meta.get("bundle_id") != self.bundle_id:
                    continue                       # written under another bundle
                idx, ts, lat = arrays["idx"], arrays["ts"], arrays["lat"]
                if lat.ndim != 2 or lat.shape[1] != dim or not len(idx) == len(ts) == len(lat):
                    raise ValueError(f"latents {lat.shape}, dim {dim}")
                h.add(str(meta["device"]), idx.astype(np.int64), ts.astype(np.float64),
                      lat.astype(np.float32))
                applied += 1
            except (StateError, KeyError, ValueError, TypeError) as exc:
                log.warning("window history log record %d skipped: %s", seq, exc)
        if records:
            h.clean = False
            self.log_bytes = sum(len(p) for _s, p in records)
        h.dirty = False
        if applied:
            log.info("window history: %d logged batch(es) replayed after the snapshot", applied)
        return h

    def mark_open(self) -> None:
        """A durable record: until the next clean stop, the history is not clean."""
        self.wal.append(encode_record({"open": True}), durable=True)

    # -- worker thread -----------------------------------------------------------------

    def hand_off(self, history: WindowHistory, *, clean: bool = False,
                 force_snapshot: bool = False) -> None:
        """Worker: pass the journal (and a copy of the rings when compaction is due) to
        the writer. Cheap: a list swap and, now and then, a few memcpy."""
        journal, history.journal = history.journal, []
        due = force_snapshot or (self.log_bytes > max(MIN_COMPACT_BYTES, self.snapshot_bytes))
        snap = history.snapshot(self.bundle_id, clean=clean) if due else None
        if journal or snap is not None:
            with self._slot:
                self._handed.append((journal, snap))

    # -- writer (main thread; or the worker for a snapshot command / at stop) -------------

    def write(self) -> None:
        """Append what was handed over, fsync once, and write a snapshot if one came.
        Raises StateError / OSError (what was not written stays handed over)."""
        with self._write:
            with self._slot:
                handed, self._handed = self._handed, []
            try:
                while handed:
                    journal, snap = handed[0]
                    for device, idx, ts, lat in journal:
                        payload = encode_record({"device": device, "bundle_id": self.bundle_id},
                                                {"idx": idx, "ts": ts, "lat": lat})
                        self.wal.append(payload, durable=False)
                        self.log_bytes += len(payload)
                    handed[0] = ([], snap)
                    self.wal.sync()
                    if snap is not None:
                        self._write_snapshot(snap)
                    handed.pop(0)
            except (ReverieError, OSError):
                with self._slot:
                    self._handed[:0] = handed
                raise

    def _write_snapshot(self, snap: dict) -> None:
        seq = self.wal.last_seq
        snap = {**snap, "wal_seq": np.array(seq, np.int64)}
        write_snapshot(self.snapshot_path, snap)
        self.snapshot_bytes = self.snapshot_path.stat().st_size
        self.log_bytes = 0
        try:
            self.wal.rotate()
            self.wal.truncate_before(seq + 1)
        except StateError as exc:     # the snapshot covers them: only disk space is lost
            log.warning("window history log not trimmed: %s", exc)

    def close(self) -> None:
        self.wal.close()
