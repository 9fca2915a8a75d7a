"""Append-only write-ahead log in numbered segment files (framing: `wal_format`).

Invariants
* Seqs are consecutive across the whole log; segment ``wal-N.log`` starts at seq N.
  Only the newest segment is ever appended to; older ones were fsynced before the next
  one was created (`rotate`), which is itself atomic (temp file, fsync, rename, fsync dir).
* ``append(durable=True)`` returns only after the frame is fsynced. A failed append
  (ENOSPC, EIO) truncates the frame away again, so the log always ends on a complete
  record; if even that fails, or fsync failed (the page cache can no longer be trusted),
  the log refuses further writes until it is reopened.

Corruption policy (SQLite-style: the log is its longest valid prefix)
* The log, as seen from a checkpoint covering seq S, is the run of valid consecutive
  records S+1, S+2, ... Reading stops at the first record that cannot be read.
* A *torn tail* -- the newest segment ends inside a record, as an interrupted write
  leaves it -- is expected after a crash: it is truncated away on open, with a warning.
* Anything else (bad checksum, wrong seq, a missing segment, a damaged segment header)
  is *corruption*: `replay` raises `LogDamagedError` after yielding the valid prefix;
  `recover` keeps the prefix, moves the damaged bytes aside (``*.damaged-<time>`` hard
  links or copies, never read again) and reports the error, naming file, offset, seq and
  how many intact-looking later records were given up. Records after a bad one are
  never replayed: later records may depend on it, and a hole would go unnoticed.
  Damage that lies wholly inside what the checkpoint already covers is only a warning.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.errors import StateError
from agent.persist import fsio
from agent.persist.wal_format import (
    SEGMENT_HEADER,
    SEGMENT_RE,
    encode_frame,
    scan_segment,
    segment_header,
    segment_name,
)

log = logging.getLogger("reverie.persist")


class LogDamagedError(StateError):
    """The log holds a damaged record or misses one; only a prefix of it is readable."""

    def __init__(self, message: str, segment_index: int, keep_bytes: int | None, next_seq: int):
        super().__init__(message)
        self.segment_index = segment_index  # first segment that is not kept whole
        self.keep_bytes = keep_bytes  # bytes of it to keep (None: drop it entirely)
        self.next_seq = next_seq  # seq of the first record that could not be read


@dataclass(frozen=True)
class _Segment:
    first_seq: int
    path: Path


class WriteAheadLog:
    """Append-only, crash-safe record log in `directory`.

    >>> wal = WriteAheadLog(tmp / "wal")
    >>> seq = wal.append(b"episode 1")            # fsynced before it returns
    >>> [p for _, p in wal.replay(after_seq=0)]
    [b'episode 1']
    """

    def __init__(self, directory: str | os.PathLike, *, max_record_bytes: int = 16 << 20,
                 max_segment_bytes: int = 16 << 20):
        self.directory = Path(directory)
        self.max_record_bytes = max_record_bytes
        self.max_segment_bytes = max_segment_bytes
        self.warnings: list[str] = []  # what opening repaired (torn tails)
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._size = 0  # bytes of the active segment up to its last complete record
        self._next_seq = 1
        self._unsynced = False
        self._refuse: str | None = None  # why appends are refused, if they are
        try:
            fsio.makedirs_private(self.directory)
            for p in self.directory.iterdir():
                if p.name.startswith(".") and ".tmp-" in p.name:
                    fsio.remove_if_exists(p)  # a rotation or salvage that never finished
        except OSError as exc:
            raise fsio.state_error("open the log directory", self.directory, exc) from exc
        self._segments = self._list_segments()
        if not self._segments:
            self._create_segment(1)
        self._open_active()

    # -- reading ------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """Seq of the newest record (0 when nothing was ever appended)."""
        return self._next_seq - 1

    @property
    def segments(self) -> list[Path]:
        return [s.path for s in self._segments]

    def replay(self, after_seq: int = 0) -> Iterator[tuple[int, bytes]]:
        """Yield ``(seq, payload)`` for every record with seq > `after_seq`, in order.

        Raises `LogDamagedError` where the valid prefix ends early (see the module doc).
        """
        return self._replay(after_seq, warnings=[])

    def _replay(self, after_seq: int, warnings: list[str]) -> Iterator[tuple[int, bytes]]:
        with self._lock:
            segments = list(self._segments)
        expected = after_seq + 1
        for i, seg in enumerate(segments):
            nxt = segments[i + 1].first_seq if i + 1 < len(segments) else None
            if nxt is not None and nxt <= expected:
                continue  # every record in it is covered already
            if seg.first_seq > expected:
                raise LogDamagedError(
                    f"{seg.path}: records {expected}..{seg.first_seq - 1} are missing "
                    f"(no log segment holds them)", i, None, expected)
            try:
                data = seg.path.read_bytes()
            except OSError as exc:
                raise fsio.state_error("read", seg.path, exc) from exc
            scan = scan_segment(data, seg.first_seq, self.max_record_bytes)
            for seq, payload in scan.records:
                if seq > after_seq:
                    yield seq, payload
            if scan.records:
                expected = max(expected, scan.records[-1][0] + 1)
            dmg = scan.damage
            if dmg is None or (nxt is None and dmg.kind == "torn"):
                continue  # a torn newest tail is an unacknowledged write, not damage
            where = f"{seg.path} at offset {dmg.offset} (seq {dmg.expected_seq}): {dmg.reason}"
            if nxt == expected:  # the next segment carries on: nothing needed was lost
                warnings.append(f"ignored damage in an old log segment: {where}")
                log.warning("%s", warnings[-1])
                continue
            lost = ""
            if dmg.later_seqs:
                first, last, count = dmg.later_seqs
                lost = f"; {count} intact-looking later records (seq {first}..{last}) are given up"
            n_later = len(segments) - i - 1
            if n_later:
                lost += f"; {n_later} later segment file(s) are given up"
            raise LogDamagedError(f"log corrupt: {where}{lost}", i, scan.end, expected)

    def recover(self, after_seq: int, *, strict: bool = False) -> tuple[list[tuple[int, bytes]], list[str]]:
        """Read the records after `after_seq` and make the log appendable again.

        On corruption, keeps the valid prefix, moves the damaged files aside and returns
        the error text among the warnings (``strict=True``: raises `LogDamagedError`).
        Appends afterwards continue at ``max(last valid seq, after_seq) + 1``.
        """
        found: list[str] = []
        records: list[tuple[int, bytes]] = []
        with self._lock:
            try:
                for record in self._replay(after_seq, found):
                    records.append(record)  # one by one: the prefix survives a raise
            except LogDamagedError as exc:
                if strict:
                    raise
                kept = self._salvage(exc)
                msg = f"{exc}; kept {len(records)} valid records after seq {after_seq}, moved {kept}"
                log.error("%s", msg)
                found.append(msg)
            self.ensure_next_seq(after_seq + 1)
        return records, self.warnings + found

    # -- writing ------------------------------------------------------------------------

    def append(self, payload: bytes, durable: bool = True) -> int:
        """Append one record and return its seq; with `durable`, fsynced before returning.

        ``durable=False`` leaves the record in the page cache (it survives a crash of the
        process, not a power cut) until `sync`, the next durable append or `close`.
        """
        if len(payload) > self.max_record_bytes:
            raise StateError(f"record of {len(payload)} bytes exceeds max_record_bytes="
                             f"{self.max_record_bytes}")
        with self._lock:
            self._check_writable()
            if self._size >= self.max_segment_bytes:
                self._rotate(self._next_seq)
            seq = self._next_seq
            frame = encode_frame(seq, bytes(payload))
            try:
                fsio.write_all(self._fd, frame)
            except OSError as exc:
                hint = ("the log still ends on its last complete record"
                        if self._truncate_back(self._size, exc) else self._refuse)
                raise fsio.state_error("append to", self._active.path, exc, hint) from exc
            self._size += len(frame)
            self._next_seq += 1
            self._unsynced = True
            if durable:
                self._fsync(drop_from=self._size - len(frame))
            return seq

    def sync(self) -> None:
        """fsync records appended with ``durable=False``."""
        with self._lock:
            self._check_writable()
            if self._unsynced:
                self._fsync(drop_from=None)

    def rotate(self) -> None:
        """Start a new segment at the next seq (after a checkpoint), if this one has records."""
        with self._lock:
            self._check_writable()
            self._rotate(self._next_seq)

    def ensure_next_seq(self, seq: int) -> None:
        """Make the next append use a seq >= `seq` (never reuse seqs a checkpoint covers)."""
        with self._lock:
            if self._next_seq < seq:
                self._check_writable()
                self._rotate(seq)

    def truncate_before(self, seq: int) -> int:
        """Delete whole segments whose records all have seq < `seq`; returns how many.

        Failing to delete only costs disk space, so it is logged, not raised.
        """
        with self._lock:
            n = 0
            while len(self._segments) > 1 and self._segments[1].first_seq <= seq:
                try:
                    os.unlink(self._segments[0].path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("cannot delete old log segment %s: %s", self._segments[0].path, exc)
                    break
                self._segments.pop(0)
                n += 1
            if n:
                try:
                    fsio.fsync_dir(self.directory)
                except OSError as exc:
                    log.warning("cannot fsync %s: %s", self.directory, exc)
            return n

    def close(self) -> None:
        """fsync pending records (best effort) and close the active segment."""
        with self._lock:
            if self._fd is None:
                return
            try:
                if self._unsynced and self._refuse is None:
                    self._fsync(drop_from=None)
            finally:
                os.close(self._fd)
                self._fd = None
                self._refuse = self._refuse or "the log is closed"

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    @property
    def _active(self) -> _Segment:
        return self._segments[-1]

    def _check_writable(self) -> None:
        if self._refuse is not None:
            raise StateError(f"{self.directory}: refusing to write: {self._refuse}")

    def _list_segments(self) -> list[_Segment]:
        found = []
        for p in self.directory.iterdir():
            m = SEGMENT_RE.match(p.name)
            if m and p.is_file():
                found.append(_Segment(int(m.group(1)), p))
        return sorted(found, key=lambda s: s.first_seq)

    def _create_segment(self, first_seq: int) -> None:
        path = self.directory / segment_name(first_seq)
        fsio.replace_atomically(path, segment_header(first_seq))
        self._segments.append(_Segment(first_seq, path))

    def _open_active(self) -> None:
        """Open the newest segment for appending, truncating a torn tail away."""
        seg = self._active
        try:
            data = seg.path.read_bytes()
        except OSError as exc:
            raise fsio.state_error("read", seg.path, exc) from exc
        scan = scan_segment(data, seg.first_seq, self.max_record_bytes)
        dmg = scan.damage
        if dmg is not None and dmg.kind == "torn" and scan.end == 0:
            fsio.replace_atomically(seg.path, segment_header(seg.first_seq))
            scan.end = SEGMENT_HEADER.size
        try:
            self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            if dmg is not None and dmg.kind == "torn" and len(data) > scan.end:
                os.ftruncate(self._fd, scan.end)
                fsio.fsync_fd(self._fd)
        except OSError as exc:
            raise fsio.state_error("repair", seg.path, exc) from exc
        if dmg is not None and dmg.kind == "torn":
            msg = (f"{seg.path}: discarded a torn record at offset {dmg.offset} "
                   f"(seq {dmg.expected_seq}, {len(data) - dmg.offset} bytes): {dmg.reason}")
            log.warning("%s", msg)
            self.warnings.append(msg)
        elif dmg is not None:
            self._refuse = f"{seg.path} is corrupt ({dmg.reason}); call recover() first"
        self._size = scan.end
        self._next_seq = scan.records[-1][0] + 1 if scan.records else seg.first_seq
        self._unsynced = False

    def _rotate(self, first_seq: int) -> None:
        if first_seq == self._active.first_seq and self._size <= SEGMENT_HEADER.size:
            return  # already an empty segment starting there
        if self._unsynced:
            self._fsync(drop_from=None)  # older segments must be complete before a newer exists
        old, old_empty = self._active, self._size <= SEGMENT_HEADER.size
        self._create_segment(first_seq)
        os.close(self._fd)
        self._fd = None
        if old_empty:  # holds no record; keeping it would only look like a gap
            self._segments.remove(old)
            fsio.remove_if_exists(old.path, quiet=True)
        self._open_active()

    def _fsync(self, drop_from: int | None) -> None:
        try:
            fsio.fsync_fd(self._fd)
        except OSError as exc:
            # After a failed fsync the kernel may have dropped the dirty pages: nothing
            # written since the last good fsync can be trusted, so stop writing.
            if drop_from is not None:
                self._truncate_back(drop_from, exc)
                self._next_seq -= 1
            self._refuse = f"fsync failed ({exc}); reopen the log"
            raise fsio.state_error("fsync", self._active.path, exc, "the record is not durable") from exc
        self._unsynced = False

    def _truncate_back(self, offset: int, exc: OSError) -> bool:
        try:
            os.ftruncate(self._fd, offset)
        except OSError as exc2:
            self._refuse = f"could not remove a partial record after {exc} ({exc2}); reopen the log"
            return False
        self._size = offset
        return True

    def _salvage(self, exc: LogDamagedError) -> str:
        """Keep the valid prefix; hard-link or copy damaged files aside; reopen."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        moved: list[str] = []

        def aside_name(seg: _Segment) -> Path:
            n = 0
            while (p := seg.path.with_name(f"{seg.path.name}.damaged-{stamp}-{n}")).exists():
                n += 1
            return p

        self._refuse = "an earlier salvage failed; reopen the log"
        try:
            os.close(self._fd)
            self._fd = None
            i = exc.segment_index
            damaged, later = self._segments[i], self._segments[i + 1 :]
            if exc.keep_bytes is not None:
                data = damaged.path.read_bytes()
                aside = aside_name(damaged)
                try:
                    os.link(damaged.path, aside)
                except OSError:  # e.g. FAT has no hard links
                    fsio.write_file_durable(aside, data)
                moved.append(aside.name)
                keep = data[: exc.keep_bytes] if exc.keep_bytes else segment_header(damaged.first_seq)
                fsio.replace_atomically(damaged.path, keep)
                kept = self._segments[: i + 1]
            else:
                later = [damaged, *later]
                kept = self._segments[:i]
            for seg in reversed(later):
                aside = aside_name(seg)
                os.replace(seg.path, aside)
                moved.append(aside.name)
            fsio.fsync_dir(self.directory)
        except OSError as err:
            raise fsio.state_error("set damaged log files aside in", self.directory, err) from err
        self._segments = kept
        self._refuse = None
        if not self._segments:
            self._create_segment(exc.next_seq)
        self._open_active()
        return ", ".join(moved) + " aside" if moved else "nothing aside"
