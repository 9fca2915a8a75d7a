"""Numbered, self-verifying checkpoints switched by an atomic CURRENT pointer.

Layout under `root`::

    CURRENT                      "000042\\n": the committed checkpoint
    checkpoints/000041/          the previous ones (the newest `keep` are kept)
    checkpoints/000042/
        <array name>.npy         np.save(..., allow_pickle=False)
        <file name>              opaque files (e.g. index.hnsw), written by a callback or copied
        meta.json                {"meta": {...}, "meta_sha256": sha256 of the canonical meta}
    checkpoints/.tmp-000043-<pid>/   a write in progress (removed by the next write)

``meta`` holds format_version, checkpoint, created_ts, wal_seq (the last log record the
checkpoint contains), arrays (dtype and shape of each), extra_files, files (sha256 and
size of every file) and the caller's free-form `info`. meta.json checks itself, so a
flipped digit in wal_seq or info is caught too.

A write goes to a temp dir; every file and the dir are fsynced; the dir is renamed into
place; only then CURRENT is replaced (temp file, fsync, rename, fsync root). A crash
at any moment leaves CURRENT naming a complete checkpoint. `load` verifies every byte
before it returns a path, so callers never open an unverified file (a crafted hnswlib
index can overflow the heap); on damage it falls back to older checkpoints, saying which
one was damaged and why. The checksums catch corruption, not attackers: anyone who can
write these owner-only (0700/0600) files can also rewrite meta.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import StateError
from agent.persist import fsio

log = logging.getLogger("reverie.persist")

FORMAT_VERSION = 1
META_NAME = "meta.json"
CURRENT_NAME = "CURRENT"
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIR_RE = re.compile(r"^\d{6,20}$")
_ARRAY_KINDS = "biufcSU"  # numbers, bools and fixed-width strings: all loadable without pickle
_MAX_META_BYTES = 16 << 20  # load refuses a larger meta.json, so write refuses to make one
MAX_CHECKPOINT_BYTES = 1 << 30

FileSource = Callable[[Path], None] | str | os.PathLike


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A verified checkpoint. `files` paths stay valid until `keep` newer ones are written."""

    number: int
    path: Path
    arrays: dict[str, np.ndarray]
    files: dict[str, Path]
    info: dict[str, Any]
    wal_seq: int
    created_ts: float
    warnings: tuple[str, ...] = ()  # newer checkpoints that were damaged, and why


class _Damaged(Exception):
    """Internal: why one checkpoint cannot be used."""


def _canonical(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def encode_meta(meta: dict[str, Any]) -> bytes:
    digest = hashlib.sha256(_canonical(meta)).hexdigest()
    return json.dumps({"meta": meta, "meta_sha256": digest}, indent=1, sort_keys=True,
                      allow_nan=False).encode()


def decode_meta(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
        meta, digest = doc["meta"], doc["meta_sha256"]
        ok = isinstance(meta, dict) and hashlib.sha256(_canonical(meta)).hexdigest() == digest
    except (ValueError, KeyError, TypeError) as exc:
        raise _Damaged(f"{META_NAME} is not valid JSON with a checksum: {exc}") from exc
    if not ok:
        raise _Damaged(f"{META_NAME} does not match its own sha256")
    return meta


def check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name == META_NAME:
        raise StateError(f"{what} name {name!r} is invalid: expected 1-128 characters of "
                         f"[A-Za-z0-9_.-], not starting with '.', and not {META_NAME!r}")
    return name


class CheckpointStore:
    """Numbered checkpoints of named arrays and opaque files under `root`.

    >>> store = CheckpointStore(tmp)
    >>> n = store.write({"latents": np.zeros((3, 8), np.float32)}, info={"n": 3}, wal_seq=3)
    >>> store.load().arrays["latents"].shape
    (3, 8)
    """

    def __init__(self, root: str | os.PathLike, *, keep: int = 3,
                 max_bytes: int = MAX_CHECKPOINT_BYTES):
        if keep < 2:
            raise StateError(f"keep={keep}: expected >= 2 (a fallback needs a previous checkpoint)")
        self.root = Path(root)
        self.checkpoints_dir = self.root / "checkpoints"
        self.keep = keep
        self.max_bytes = max_bytes
        try:
            fsio.makedirs_private(self.checkpoints_dir)
        except OSError as exc:
            raise fsio.state_error("create", self.checkpoints_dir, exc) from exc

    # -- listing ------------------------------------------------------------------------

    def numbers(self) -> list[int]:
        """Numbers of the checkpoint directories on disk, oldest first."""
        return sorted(int(p.name) for p in self.checkpoints_dir.iterdir()
                      if _DIR_RE.match(p.name) and p.is_dir())

    def path_of(self, number: int) -> Path:
        return self.checkpoints_dir / f"{number:06d}"

    def current(self) -> int | None:
        """The number CURRENT names, or None if it is missing or unreadable."""
        try:
            text = (self.root / CURRENT_NAME).read_text("ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if _DIR_RE.match(text) else None

    def covered_seqs(self) -> dict[int, int]:
        """``{number: wal_seq}`` of every checkpoint whose meta.json verifies (no file hashing)."""
        out = {}
        for n in self.numbers():
            try:
                meta = decode_meta(self._read_meta(self.path_of(n)))
                if isinstance(meta.get("wal_seq"), int):
                    out[n] = meta["wal_seq"]
            except (_Damaged, OSError):
                continue
        return out

    # -- writing ------------------------------------------------------------------------

    def write(self, arrays: Mapping[str, np.ndarray], files: Mapping[str, FileSource] | None = None,
              info: Mapping[str, Any] | None = None, wal_seq: int = 0) -> int:
        """Write a new checkpoint, make it CURRENT and return its number.

        `files` maps a file name to a writer ``fn(path)`` that creates the file at `path`
        (e.g. ``lambda p: index.save_index(str(p))``) or to an existing file to copy.
        On failure (ENOSPC, EIO) raises `StateError`; the previous checkpoint stays CURRENT.
        So does a checkpoint that would exceed `max_bytes` in total, or whose meta.json
        would exceed what `load` reads (16 MiB): a checkpoint is never written that a
        restart would refuse.
        """
        files = dict(files or {})
        info = dict(info or {})
        self._validate(arrays, files, info, wal_seq)
        declared = sum(np.asarray(a).nbytes for a in arrays.values())
        number = max([*self.numbers(), self.current() or 0]) + 1
        final = self.path_of(number)
        tmp = self.checkpoints_dir / f".tmp-{number:06d}-{os.getpid()}"
        self._remove_temp_dirs()
        renamed = False
        if declared > self.max_bytes:
            raise StateError(f"cannot write checkpoint {final}: its arrays hold {declared} "
                             f"bytes, more than max_bytes={self.max_bytes}; the previous "
                             "checkpoint is still current")
        try:
            fsio.mkdir_private(tmp)
            table: dict[str, dict[str, Any]] = {}
            for name, arr in arrays.items():
                table[f"{name}.npy"] = _write_array(tmp / f"{name}.npy", np.asarray(arr))
            for name, src in files.items():
                table[name] = _write_file(tmp / name, src)
            meta = {
                "format_version": FORMAT_VERSION, "checkpoint": number,
                "created_ts": time.time(), "wal_seq": wal_seq,
                "arrays": {k: {"dtype": np.asarray(a).dtype.str, "shape": list(np.shape(a))}
                           for k, a in arrays.items()},
                "extra_files": sorted(files), "files": table, "info": info,
            }
            raw_meta = encode_meta(meta)
            total = sum(f["bytes"] for f in table.values()) + len(raw_meta)
            if len(raw_meta) > _MAX_META_BYTES or total > self.max_bytes:
                what = (f"{META_NAME} would be {len(raw_meta)} bytes, more than the "
                        f"{_MAX_META_BYTES} a load reads" if len(raw_meta) > _MAX_META_BYTES
                        else f"it would be {total} bytes, more than max_bytes={self.max_bytes}")
                raise StateError(f"cannot write checkpoint {final}: {what}; the previous "
                                 "checkpoint is still current")
            fsio.write_file_durable(tmp / META_NAME, raw_meta)
            fsio.fsync_dir(tmp)
            os.rename(tmp, final)
            renamed = True
            fsio.fsync_dir(self.checkpoints_dir)
        except OSError as exc:
            shutil.rmtree(final if renamed else tmp, ignore_errors=True)
            raise fsio.state_error("write checkpoint", final, exc,
                                   "the previous checkpoint is still current") from exc
        except BaseException:
            shutil.rmtree(final if renamed else tmp, ignore_errors=True)
            raise
        try:
            fsio.replace_atomically(self.root / CURRENT_NAME, f"{final.name}\n".encode())
        except StateError:
            if self.current() != number:  # not switched: the new dir is an orphan
                shutil.rmtree(final, ignore_errors=True)
            raise
        self._prune(number)
        return number

    def _validate(self, arrays, files, info, wal_seq) -> None:
        names = set()
        for name, arr in arrays.items():
            check_name(name, "array")
            if not isinstance(arr, np.ndarray) or arr.dtype.kind not in _ARRAY_KINDS:
                raise StateError(f"array {name!r} must be a numeric or string ndarray, "
                                 f"got {type(arr).__name__} {getattr(arr, 'dtype', '')}")
            names.add(f"{name}.npy")
        for name in files:
            check_name(name, "file")
            if name in names:
                raise StateError(f"file name {name!r} collides with an array's file")
        if not isinstance(wal_seq, int) or wal_seq < 0:
            raise StateError(f"wal_seq={wal_seq!r}: expected an int >= 0")
        try:
            json.dumps(info, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StateError(f"checkpoint info is not plain JSON: {exc}") from exc

    def _remove_temp_dirs(self) -> None:
        """Leftovers of writes a crash interrupted (never visible as checkpoints)."""
        for p in self.checkpoints_dir.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(f".{CURRENT_NAME}.tmp-*"):
            fsio.remove_if_exists(p, quiet=True)

    def _prune(self, current: int) -> None:
        """Delete all but the newest `keep` checkpoints -- only ever after a switch."""
        for n in self.numbers()[: -self.keep]:
            if n != current:
                try:
                    shutil.rmtree(self.path_of(n))
                except OSError as exc:
                    log.warning("cannot delete old checkpoint %s: %s", self.path_of(n), exc)

    # -- reading ------------------------------------------------------------------------

    def load(self) -> LoadedCheckpoint | None:
        """Load and verify CURRENT, else the newest older checkpoint that verifies.

        Returns None for an empty store. Raises `StateError` if checkpoints exist but
        none verifies (the message says why each one was refused).
        """
        numbers = self.numbers()
        current = self.current()
        warnings: list[str] = []
        if (self.root / CURRENT_NAME).exists() and current not in numbers:
            what = "is unreadable" if current is None else \
                f"names checkpoint {self.path_of(current)}, which is missing"
            warnings.append(f"{self.root / CURRENT_NAME} {what}; trying the newest one on disk")
            log.warning("%s", warnings[-1])
        elif current is None and numbers:
            # A crash before the first switch leaves a complete but uncommitted checkpoint.
            log.info("%s has no CURRENT yet; using the newest checkpoint", self.root)
        if not numbers:
            if warnings:
                raise StateError("; ".join(warnings))
            return None
        order = [current] if current in numbers else []
        order += [n for n in reversed(numbers) if n != current]
        for n in order:
            try:
                ck = self._load_one(n)
            except _Damaged as exc:
                warnings.append(f"checkpoint {self.path_of(n)} is damaged: {exc}")
                log.warning("%s; falling back to an older checkpoint", warnings[-1])
                continue
            if warnings:
                log.warning("loaded checkpoint %s instead of the newest", ck.path)
            return replace(ck, warnings=tuple(warnings))
        raise StateError(f"no usable checkpoint in {self.checkpoints_dir}: " + "; ".join(warnings))

    def _read_meta(self, path: Path) -> bytes:
        with open(path / META_NAME, "rb") as f:
            raw = f.read(_MAX_META_BYTES + 1)
        if len(raw) > _MAX_META_BYTES:
            raise _Damaged(f"{META_NAME} is larger than {_MAX_META_BYTES} bytes")
        return raw

    def _load_one(self, number: int) -> LoadedCheckpoint:
        path = self.path_of(number)
        try:
            meta = decode_meta(self._read_meta(path))
        except OSError as exc:
            raise _Damaged(f"cannot read {META_NAME}: {exc}") from exc
        try:
            if meta["format_version"] != FORMAT_VERSION:
                raise _Damaged(f"format_version {meta['format_version']!r}, this build reads "
                               f"{FORMAT_VERSION}")
            if meta["checkpoint"] != number or not isinstance(meta["wal_seq"], int):
                raise _Damaged(f"meta names checkpoint {meta['checkpoint']!r} / wal_seq "
                               f"{meta['wal_seq']!r}")
            table = {check_name(k, "file"): (v["sha256"], int(v["bytes"]))
                     for k, v in meta["files"].items()}
            specs = {check_name(k, "array"): (str(v["dtype"]), [int(d) for d in v["shape"]])
                     for k, v in meta["arrays"].items()}
            extras = [check_name(k, "file") for k in meta["extra_files"]]
            info, created = dict(meta["info"]), float(meta["created_ts"])
        except (KeyError, TypeError, ValueError, AttributeError, StateError) as exc:
            raise _Damaged(f"malformed {META_NAME}: {exc!r}") from exc
        missing = [f"{k}.npy" for k in specs if f"{k}.npy" not in table]
        missing += [k for k in extras if k not in table]
        if missing:
            raise _Damaged(f"{META_NAME} lists no checksum for {missing}")
        for name, (digest, size) in table.items():  # every byte, before anyone opens a file
            _verify_file(path / name, digest, size)
        arrays = {}
        for name, (dtype, shape) in specs.items():
            try:
                arr = np.load(path / f"{name}.npy", allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:
                raise _Damaged(f"{name}.npy does not load: {exc}") from exc
            if not isinstance(arr, np.ndarray) or arr.dtype.str != dtype or list(arr.shape) != shape:
                raise _Damaged(f"{name}.npy holds {getattr(arr, 'dtype', '?')} "
                               f"{getattr(arr, 'shape', '?')}, meta says {dtype} {shape}")
            arrays[name] = arr
        return LoadedCheckpoint(number, path, arrays, {k: path / k for k in extras}, info,
                                meta["wal_seq"], created)


def _verify_file(path: Path, digest: str, size: int) -> None:
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise _Damaged(f"{path.name} is not a regular file")
        if st.st_size != size:
            raise _Damaged(f"{path.name} has {st.st_size} bytes, meta says {size}")
        actual, _ = fsio.sha256_file(path)
    except OSError as exc:
        raise _Damaged(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    if actual != digest:
        raise _Damaged(f"{path.name} sha256 mismatch (meta {str(digest)[:12]}..., "
                       f"file {actual[:12]}...)")


def _write_array(path: Path, arr: np.ndarray) -> dict[str, Any]:
    fd = fsio.open_new(path)
    try:
        writer = fsio.HashingWriter(fd)
        np.save(writer, arr, allow_pickle=False)
        fsio.fsync_fd(fd)
    finally:
        os.close(fd)
    return {"sha256": writer.sha256.hexdigest(), "bytes": writer.n_bytes}


def _write_file(path: Path, src: FileSource) -> dict[str, Any]:
    if callable(src):
        src(path)
        if not path.is_file() or path.is_symlink():
            raise StateError(f"the writer for {path.name!r} did not create a regular file at {path}")
        os.chmod(path, fsio.FILE_MODE)  # a library's writer uses the umask's mode
        fsio.fsync_path(path)
        digest, size = fsio.sha256_file(path)
        return {"sha256": digest, "bytes": size}
    fd = fsio.open_new(path)
    try:
        writer = fsio.HashingWriter(fd)
        with open(src, "rb") as f:
            while chunk := f.read(1 << 20):
                writer.write(chunk)
        fsio.fsync_fd(fd)
    finally:
        os.close(fd)
    return {"sha256": writer.sha256.hexdigest(), "bytes": writer.n_bytes}
