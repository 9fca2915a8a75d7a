"""`NonceStore`: the nonces of signed commands seen within the freshness window, kept
across restarts, so a captured signed command cannot be replayed (docs/protocol.md,
"Who may change state").

A signed command carries ``ts`` and a ``nonce``; the agent accepts it only when ``ts`` is
within ``max_age_s`` of its clock and the nonce was not used before. A nonce therefore
needs remembering only while a command carrying it could still be fresh: ``2 *
max_age_s`` after the later of its ``ts`` and its arrival. The store is an append-only
file of ``"<expiry epoch s> <nonce>\\n"`` lines (0600, fsynced before the command runs),
rewritten without the expired lines when it has grown to twice what is live.

Bounded: at most `max_entries` live nonces; a command beyond that is refused (a flood of
valid signatures means the key leaked, and refusing keeps the state bounded).

>>> import tempfile
>>> store = NonceStore(Path(tempfile.mkdtemp()) / "command_nonces", max_entries=100)
>>> store.claim("3f9c", expires=time.time() + 600)
True
>>> store.claim("3f9c", expires=time.time() + 600)      # a replay
False
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

from agent.errors import StateError
from agent.persist import fsio

log = logging.getLogger("reverie.persist")
NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class NonceStore:
    """Nonces seen and not yet expired; in memory only when `path` is None."""

    def __init__(self, path: Path | None, *, max_entries: int = 10_000):
        self.path = path
        self.max_entries = max_entries
        self._live: dict[str, float] = {}       # nonce -> expiry (epoch s)
        self._lines = 0                         # lines in the file
        self._lock = threading.Lock()
        if path is not None:
            self._load()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, nonce: str) -> bool:
        with self._lock:
            return self._live.get(nonce, 0.0) > time.time()

    def claim(self, nonce: str, *, expires: float) -> bool:
        """Record `nonce` (durably, with a path) and return True; False if it was seen.

        Raises `StateError` when the store is full of live nonces or cannot be written
        (the command is then refused: running it unrecorded would allow a replay)."""
        now = time.time()
        with self._lock:
            if self._live.get(nonce, 0.0) > now:
                return False
            self._expire(now)
            if len(self._live) >= self.max_entries:
                raise StateError(f"{len(self._live)} signed commands within the freshness "
                                 f"window (at most {self.max_entries}): refusing more")
            if self.path is not None:
                self._append(f"{expires:.3f} {nonce}\n".encode())
            self._live[nonce] = expires
            if self.path is not None and self._lines > max(64, 2 * len(self._live)):
                self._compact()
            return True

    # -- file ----------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise fsio.state_error("read", self.path, exc) from exc
        now = time.time()
        bad = 0
        for line in raw.split(b"\n"):
            if not line:
                continue
            self._lines += 1
            try:
                expiry_text, nonce = line.decode("ascii").split(" ")
                expiry = float(expiry_text)
            except (UnicodeDecodeError, ValueError):
                bad += 1      # a torn last line (crash mid-append): that command never ran
                continue
            if NONCE_RE.match(nonce) and expiry > now:
                self._live[nonce] = max(expiry, self._live.get(nonce, 0.0))
        if bad:
            log.warning("%s: %d unreadable line(s) ignored", self.path, bad)

    def _append(self, line: bytes) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                         fsio.FILE_MODE)
            try:
                fsio.write_all(fd, line)
                fsio.fsync_fd(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise fsio.state_error("append to", self.path, exc,
                                   "the command is refused (it could be replayed)") from exc
        self._lines += 1

    def _compact(self) -> None:
        body = "".join(f"{e:.3f} {n}\n" for n, e in self._live.items()).encode()
        try:
            fsio.replace_atomically(self.path, body)
        except StateError as exc:      # the longer file is still correct
            log.warning("cannot compact the nonce store: %s", exc)
            return
        self._lines = len(self._live)

    def _expire(self, now: float) -> None:
        for nonce in [n for n, e in self._live.items() if e <= now]:
            del self._live[nonce]
