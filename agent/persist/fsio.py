"""Durable, owner-only file primitives shared by the checkpoint store and the log.

Every byte goes through `write_all` (one place where a full disk or an I/O error is
turned into a `StateError` naming the path), every file is created 0600 and every
directory 0700 whatever the umask, and "durable" always means: data fsynced, then the
directory entry fsynced.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from pathlib import Path

from agent.errors import StateError

FILE_MODE = 0o600
DIR_MODE = 0o700
_CHUNK = 1 << 20


def state_error(action: str, path: Path | str, exc: OSError, hint: str = "") -> StateError:
    """A `StateError` that names the path and the errno (e.g. ENOSPC) of `exc`."""
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    msg = f"cannot {action} {path}: {exc.strerror or exc} ({code})"
    return StateError(f"{msg}; {hint}" if hint else msg)


def mkdir_private(path: Path) -> None:
    """Create `path` (not its parents) with mode 0700; an existing directory is kept."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask; chmod is not


def makedirs_private(path: Path) -> None:
    """Create `path` and any missing parents, each new one with mode 0700."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        mkdir_private(p)


def open_new(path: Path) -> int:
    """Create `path` exclusively for writing, mode 0600, and return the descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def open_lock(path: Path) -> int:
    """Open (creating, 0600) a lock file for `fcntl.flock`."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of `data` (os.write may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        if n <= 0:  # a regular file never does this; do not spin if it does
            raise OSError(errno.EIO, "write returned 0")
        view = view[n:]


def fsync_fd(fd: int) -> None:
    # fdatasync flushes the data and the file size (all a reader needs) and skips the
    # mtime update, which is measurably cheaper on SD cards.
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (creates, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a few file systems cannot fsync a directory
            raise
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file someone else wrote (e.g. a library's `save_index`)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durable(path: Path, data: bytes) -> None:
    """Write a new file (must not exist) and fsync it; the caller fsyncs the directory."""
    fd = open_new(path)
    try:
        write_all(fd, data)
        fsync_fd(fd)
    finally:
        os.close(fd)


def replace_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: write a temp file, fsync, rename over, fsync the dir.

    A crash at any moment leaves either the old or the new content under `path`.
    Raises `StateError` (the old file is intact, the temp file removed) on failure
    before the rename.
    """
    # Unique per call, not per process: two threads replacing the same file must never
    # write (or rename) each other's half-written temp file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}")
    try:
        remove_if_exists(tmp)
        write_file_durable(tmp, data)
        os.replace(tmp, path)
    except OSError as exc:
        remove_if_exists(tmp, quiet=True)
        raise state_error("write", path, exc, "the previous version is intact") from exc
    try:
        fsync_dir(path.parent)
    except OSError as exc:
        raise state_error("fsync the directory of", path, exc) from exc


def remove_if_exists(path: Path, quiet: bool = False) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        if not quiet:
            raise


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class HashingWriter:
    """A write-only file object over a descriptor that hashes what it writes.

    `np.save(HashingWriter(fd), arr)` streams the array through `write_all`, so a full
    disk surfaces as an OSError here and the sha256 comes for free (no read-back).
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.sha256 = hashlib.sha256()
        self.n_bytes = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        write_all(self.fd, view)
        self.sha256.update(view)
        self.n_bytes += len(view)
        return len(view)

    def flush(self) -> None:
        pass
