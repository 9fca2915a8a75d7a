"""`StateDir`: one crash-safe state directory = checkpoints + write-ahead log.

Layout under `root` (dirs 0700, files 0600)::

    LOCK                 flock: one process per state dir
    CURRENT              names the committed checkpoint (see `checkpoint`)
    checkpoints/000042/  arrays, opaque files, meta.json
    wal/wal-000000000501.log   records after what the checkpoints cover

Life cycle: ``open -> recover() -> log()/checkpoint() ... -> close()``.
State after a restart = the loaded checkpoint + the log records after its `wal_seq`.
Log segments are kept back to the *oldest* retained checkpoint, so falling back to an
older checkpoint (the newest is damaged) still replays everything logged since.

>>> with StateDir(tmp) as state:
...     rec = state.recover()                     # (None, [], []) the first time
...     seq = state.log(encode_record({"label": "walk"}, {"h": h}))  # durable on return
...     state.checkpoint({"latents": latents}, {"index.hnsw": index_writer}, {"n": 1})
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import StateError
from agent.persist import fsio
from agent.persist.checkpoint import (
    MAX_CHECKPOINT_BYTES,
    CheckpointStore,
    FileSource,
    LoadedCheckpoint,
)
from agent.persist.wal import WriteAheadLog

log = logging.getLogger("reverie.persist")


@dataclass(frozen=True)
class Recovery:
    """What `StateDir.recover` found: rebuild state = `checkpoint` + `records` in order."""

    checkpoint: LoadedCheckpoint | None
    records: list[tuple[int, bytes]]  # (seq, payload), consecutive seqs after checkpoint.wal_seq
    warnings: list[str]  # damaged checkpoints, torn or corrupt log, each naming the file

    @property
    def last_seq(self) -> int:
        if self.records:
            return self.records[-1][0]
        return self.checkpoint.wal_seq if self.checkpoint else 0


class StateDir:
    """A state directory; see the module doc. Thread-safe; one process at a time."""

    def __init__(self, root: str | os.PathLike, *, keep_checkpoints: int = 3, strict: bool = False,
                 max_record_bytes: int = 16 << 20, max_segment_bytes: int = 16 << 20,
                 max_checkpoint_bytes: int = MAX_CHECKPOINT_BYTES):
        self.root = Path(root)
        self.strict = strict
        self._lock = threading.RLock()
        self._recovered = False
        self._checkpoint_seq = 0       # the last record the newest checkpoint covers
        try:
            fsio.makedirs_private(self.root)
            self._lock_fd = fsio.open_lock(self.root / "LOCK")
        except OSError as exc:
            raise fsio.state_error("open the state directory", self.root, exc) from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise StateError(f"{self.root} is in use by another process (LOCK is held): stop "
                             "the daemon that uses it, or use another state directory") from None
        try:
            self.store = CheckpointStore(self.root, keep=keep_checkpoints,
                                         max_bytes=max_checkpoint_bytes)
            self.wal = WriteAheadLog(self.root / "wal", max_record_bytes=max_record_bytes,
                                     max_segment_bytes=max_segment_bytes)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def recover(self) -> Recovery:
        """Load the newest verifying checkpoint and the log records after it.

        Damage is repaired as far as it safely can be and reported in `warnings`
        (also logged); with ``strict=True`` damage raises `StateError` instead.
        """
        with self._lock:
            warnings: list[str] = []
            try:
                ckpt = self.store.load()
            except StateError as exc:
                if self.strict:
                    raise
                log.error("%s; starting without a checkpoint", exc)
                warnings.append(f"{exc}; starting without a checkpoint")
                ckpt = None
            if ckpt is not None:
                warnings.extend(ckpt.warnings)
            covered = ckpt.wal_seq if ckpt else 0
            records, log_warnings = self.wal.recover(covered, strict=self.strict)
            warnings.extend(log_warnings)
            # Never reuse a seq that any checkpoint on disk claims to cover.
            floor = max(self.store.covered_seqs().values(), default=0)
            self.wal.ensure_next_seq(floor + 1)
            self._recovered = True
            self._checkpoint_seq = covered if not records else -1   # replayed: not covered
            return Recovery(ckpt, records, warnings)

    def log(self, payload: bytes, durable: bool = True) -> int:
        """Append one record; returns its seq. `durable`: fsynced before returning."""
        self._require_recovered()
        return self.wal.append(payload, durable=durable)

    @property
    def changed(self) -> bool:
        """True when records were logged since the last checkpoint (or recovery replayed
        some): a periodic checkpoint of an unchanged state would only copy it."""
        return self.wal.last_seq != self._checkpoint_seq

    def sync(self) -> None:
        """Make records logged with ``durable=False`` durable."""
        self.wal.sync()

    def checkpoint(self, arrays: Mapping[str, np.ndarray],
                   files: Mapping[str, FileSource] | None = None,
                   info: Mapping[str, Any] | None = None, *, wal_seq: int | None = None) -> int:
        """Write a checkpoint of state that contains every record up to `wal_seq`.

        `wal_seq` defaults to the last record logged; pass it explicitly when another
        thread may log between taking the snapshot and this call. Returns the number.
        On failure raises `StateError`; the previous checkpoint and the log stay intact.
        """
        with self._lock:
            self._require_recovered()
            self.wal.sync()
            covered = self.wal.last_seq if wal_seq is None else wal_seq
            if covered > self.wal.last_seq:
                raise StateError(f"wal_seq={covered} is beyond the last logged record "
                                 f"{self.wal.last_seq}")
            number = self.store.write(arrays, files, info, wal_seq=covered)
            self._checkpoint_seq = covered
            try:
                self.wal.rotate()
            except StateError as exc:  # the log stays valid in its current segment
                log.warning("checkpoint %d written, but the log did not rotate: %s", number, exc)
            seqs = self.store.covered_seqs()
            if seqs and len(seqs) == len(self.store.numbers()):  # else keep everything
                self.wal.truncate_before(min(seqs.values()) + 1)
            return number

    def close(self) -> None:
        with self._lock:
            if self._lock_fd < 0:
                return
            try:
                self.wal.close()
            finally:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = -1

    def __enter__(self) -> StateDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_recovered(self) -> None:
        if not self._recovered:
            raise StateError(f"{self.root}: call recover() before writing, so the log "
                             "continues after what the checkpoint covers")
