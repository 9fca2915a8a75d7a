"""The NPZ dataset format used by every command that takes ``--data``.

An ``.npz`` file, loaded with ``allow_pickle=False``:

=================  ==========================================================
key                meaning
=================  ==========================================================
``X``              float ``(N, C, T)`` windows or ``(N, F)`` feature vectors
``y``              ``(N,)`` integer or string labels
``X_test``         optional, same layout as ``X`` (else a seeded stratified split)
``y_test``         optional, required with ``X_test``
``classes``        optional ``(K,)`` strings; integer ``y`` indexes it
``channels``       optional ``(C,)`` strings
``sample_rate_hz`` optional scalar
=================  ==========================================================

Labels are normalised to integer indices into ``classes`` (strings). A file that breaks
the format raises DatasetError whose one-line message names the key, shape or dtype.

Layout. ``(N, C, T)`` and ``(N, T, C)`` cannot be told apart from the array alone. When
something else says how many channels there are -- the ``channels`` key, or the input
shape of the bundle the data is for (``load_dataset(..., input_shape=(C, T))``) -- a
transposed ``X`` is an error that says so and how to fix it. Otherwise a file with more
"channels" than samples per window is suspicious: `load_dataset` logs the layout it
assumed (``reverie.dataset`` warning), so a transposed file does not pass silently.

`read_npz` reads the zip itself rather than through ``np.load``: each member's ``.npy``
header is checked against the bytes the member really holds *before* anything is
allocated, so a header declaring a terabyte (or a member that is no array at all, or an
object array that would need pickle) is an error naming the key, never a MemoryError.
It is shared with the other NPZ readers (bundle exemplars) through its ``error`` class.
"""

from __future__ import annotations

import io
import logging
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.errors import DatasetError, ReverieError

log = logging.getLogger("reverie.dataset")
KNOWN_KEYS = {"X", "y", "X_test", "y_test", "classes", "channels", "sample_rate_hz"}
MAX_NPZ_BYTES = 4 * 2**30     # uncompressed array bytes read from one file (a zip bomb stops here)
MAX_CLASSES = 100_000         # integer labels without ``classes`` name at most this many
_ZIP_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error,
               NotImplementedError, RuntimeError)   # RuntimeError: an encrypted member


@dataclass(frozen=True)
class Dataset:
    X: np.ndarray  # (N, C, T) or (N, F) float32
    y: np.ndarray  # (N,) int64 indices into classes
    X_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    channels: tuple[str, ...] | None
    sample_rate_hz: float | None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.X.shape[1:])


def _as_strings(arr: np.ndarray, key: str) -> tuple[str, ...]:
    if arr.ndim != 1:
        raise DatasetError(f"{key}: expected a 1-D array of strings, got shape {arr.shape}")
    if arr.dtype.kind not in "US":
        raise DatasetError(f"{key}: expected strings, got dtype {arr.dtype}")
    try:
        out = tuple(str(s.decode() if isinstance(s, bytes) else s) for s in arr.tolist())
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{key}: a byte string is not UTF-8 ({exc})") from None
    if any(not s for s in out):
        raise DatasetError(f"{key}: contains an empty string")
    return out


def _check_X(X: np.ndarray, key: str) -> np.ndarray:
    if X.dtype.kind not in "fiu":
        raise DatasetError(f"{key}: expected a float array, got dtype {X.dtype}")
    if X.ndim not in (2, 3):
        raise DatasetError(f"{key}: expected shape (N, C, T) or (N, F), got {X.shape}")
    if X.shape[0] == 0 or any(d == 0 for d in X.shape[1:]):
        raise DatasetError(f"{key}: has an empty dimension, shape {X.shape}")
    with np.errstate(over="ignore"):     # too large for float32: Inf, refused below
        X = X.astype(np.float32)
    bad = ~np.isfinite(X)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DatasetError(f"{key}: contains NaN/Inf (first at index {idx})")
    return X


def _labels(y: np.ndarray, key: str, n: int, classes: tuple[str, ...] | None
            ) -> tuple[np.ndarray, tuple[str, ...]]:
    if y.ndim != 1 or y.shape[0] != n:
        raise DatasetError(f"{key}: expected shape ({n},), got {y.shape}")
    if y.dtype.kind in "iu":
        lo, hi = int(y.min()), int(y.max())    # Python ints: a uint64 label cannot wrap
        if classes is None:
            if lo < 0:
                raise DatasetError(f"{key}: negative label {lo} (no 'classes' given)")
            if hi >= MAX_CLASSES:
                raise DatasetError(f"{key}: label {hi} implies {hi + 1} classes, at most "
                                   f"{MAX_CLASSES} without a 'classes' array")
            classes = tuple(str(i) for i in range(hi + 1))
        if lo < 0 or hi >= len(classes):
            bad_label = lo if lo < 0 else hi
            raise DatasetError(
                f"{key}: label {bad_label} outside 0..{len(classes) - 1} (len(classes)={len(classes)})")
        return y.astype(np.int64), classes
    if y.dtype.kind in "US":
        names = _as_strings(y, key)
        if classes is None:
            classes = tuple(sorted(set(names)))
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise DatasetError(f"{key}: label(s) {unknown[:5]} not in classes")
        return np.array([index[s] for s in names], dtype=np.int64), classes
    raise DatasetError(f"{key}: expected integer or string labels, got dtype {y.dtype}")


def read_npz(path: str | Path | bytes, error: type[ReverieError] = DatasetError, *,
             max_bytes: int = MAX_NPZ_BYTES,
             name: str | Path | None = None) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file by key; `error` (e.g. DatasetError, BundleError)
    names the member for anything that is not a plain ``.npy`` array whose header matches
    the bytes it holds: no pickle (object dtype), no allocation beyond what the member
    really holds, at most `max_bytes` of array data in all.

    >>> read_npz("data.npz")["X"].shape             # doctest: +SKIP
    (600, 6, 128)
    """
    source = io.BytesIO(path) if isinstance(path, bytes | bytearray) else Path(path)
    path = Path(name) if name is not None else (
        source if isinstance(source, Path) else Path("<bytes>"))
    try:
        zf = zipfile.ZipFile(source)
    except _ZIP_ERRORS as exc:
        raise error(f"{path}: not a readable .npz (zip) file ({exc})") from None
    arrays: dict[str, np.ndarray] = {}
    total = 0
    with zf:
        for info in zf.infolist():
            key = info.filename.removesuffix(".npy")
            if key in arrays:
                raise error(f"{path}: key {key!r} appears twice")
            try:
                arrays[key] = _read_member(zf, info, max_bytes - total, max_bytes)
            except _ZIP_ERRORS as exc:
                raise error(f"{path}: member {info.filename!r} is not a readable .npy "
                            f"array ({exc})") from None
            total += arrays[key].nbytes
    return arrays


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int,
                 max_bytes: int) -> np.ndarray:
    """One ``.npy`` member; ValueError (with the reason) for anything else."""
    fmt = np.lib.format
    with zf.open(info) as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
        if dtype.hasobject:
            raise ValueError(f"dtype {dtype} holds Python objects (needs pickle: refused)")
        if any(d < 0 for d in shape) or dtype.itemsize == 0:
            raise ValueError(f"shape {shape} of dtype {dtype} is not a plain array")
        nbytes = math.prod(shape) * dtype.itemsize
        held = info.file_size - f.tell()
        if nbytes != held:
            raise ValueError(f"header declares shape {shape} {dtype} = {nbytes} bytes, "
                             f"the member holds {held}")
        if nbytes > budget:
            raise ValueError(f"{nbytes} bytes of array data exceed what is left of the "
                             f"{max_bytes}-byte limit (max_bytes)")
        data = f.read(nbytes)
        if len(data) != nbytes or f.read(1):      # reading to the end checks the CRC
            raise ValueError(f"member holds {len(data)} bytes, expected {nbytes}")
    arr = np.frombuffer(data, dtype=dtype)
    return arr.reshape(shape, order="F" if fortran else "C").copy()


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)``: each class keeps ~``test_fraction`` of its rows for test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        rng.shuffle(rows)
        n_test = int(round(len(rows) * test_fraction))
        if len(rows) >= 2:
            n_test = min(max(n_test, 1), len(rows) - 1)
        else:
            n_test = 0
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _check_layout(path: Path, X: np.ndarray, channels: tuple[str, ...] | None,
                  input_shape: tuple[int, ...] | None) -> None:
    """(N, C, T) or (N, T, C)? See "Layout" in the module docstring."""
    shape = tuple(int(d) for d in X.shape[1:])
    fix = "transpose it: np.savez(..., X=X.transpose(0, 2, 1), ...)"
    if X.ndim == 3 and channels is not None and len(channels) != shape[0]:
        if len(channels) == shape[1]:
            raise DatasetError(f"{path}: {len(channels)} channel names but X is (N, {shape[0]}, "
                               f"{shape[1]}): X looks like (N, T, C); {fix}")
        raise DatasetError(f"channels: {len(channels)} names but X has {shape[0]} channels "
                           "(axis 1)")
    if input_shape is not None:
        want = tuple(int(d) for d in input_shape)
        if shape == want:
            return
        if X.ndim == 3 and shape == want[::-1]:
            raise DatasetError(f"{path}: X is (N, {shape[0]}, {shape[1]}) but the bundle takes "
                               f"windows of (C, T) = {want}: X looks like (N, T, C); {fix}")
        raise DatasetError(f"{path}: X has windows of shape {shape}, the bundle takes {want} "
                           "(channels x samples): a dataset for another model?")
    if X.ndim == 3 and channels is None and shape[0] > shape[1]:
        log.warning("%s: X is (N, %d, %d): taken as (N, C, T), %d channels of %d samples; if "
                    "it is (N, T, C), %s (or add a 'channels' key to say which)", path,
                    shape[0], shape[1], shape[0], shape[1], fix)


def load_dataset(path: str | Path, *, test_fraction: float = 0.2, seed: int = 0,
                 input_shape: tuple[int, ...] | None = None) -> Dataset:
    """Load and validate an NPZ dataset; raise DatasetError with a one-line reason.

    `input_shape`: the ``(C, T)`` (or ``(F,)``) the data is for, e.g. a bundle's
    ``bundle.input.shape``: windows of another shape are an error naming both, and a
    transposed ``(N, T, C)`` file says so.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    arrays = read_npz(path, DatasetError)
    for key in ("X", "y"):
        if key not in arrays:
            raise DatasetError(f"{path}: missing key {key!r} (found {sorted(arrays)})")
    unknown = sorted(set(arrays) - KNOWN_KEYS)
    if unknown:
        raise DatasetError(f"{path}: unknown key(s) {unknown} (known: {sorted(KNOWN_KEYS)})")

    classes = _as_strings(arrays["classes"], "classes") if "classes" in arrays else None
    if classes is not None and len(set(classes)) != len(classes):
        raise DatasetError("classes: contains duplicates")
    X = _check_X(arrays["X"], "X")
    y, classes = _labels(arrays["y"], "y", X.shape[0], classes)

    if ("X_test" in arrays) != ("y_test" in arrays):
        raise DatasetError("X_test and y_test must be given together")
    if "X_test" in arrays:
        X_test = _check_X(arrays["X_test"], "X_test")
        if X_test.shape[1:] != X.shape[1:]:
            raise DatasetError(f"X_test: shape {X_test.shape} does not match X {X.shape} after N")
        y_test, classes2 = _labels(arrays["y_test"], "y_test", X_test.shape[0], classes)
        if classes2 != classes:
            raise DatasetError("y_test: labels not in the classes of y")
    else:
        tr, te = stratified_split(y, test_fraction, seed)
        X, X_test, y, y_test = X[tr], X[te], y[tr], y[te]

    channels = None
    if "channels" in arrays:
        channels = _as_strings(arrays["channels"], "channels")
        if X.ndim == 2 and len(channels) != X.shape[1]:
            raise DatasetError(f"channels: {len(channels)} names but X has {X.shape[1]} "
                               "features (axis 1)")
    _check_layout(path, X, channels, input_shape)
    rate = None
    if "sample_rate_hz" in arrays:
        r = arrays["sample_rate_hz"]
        if r.shape != () or r.dtype.kind not in "fiu" or not np.isfinite(r) or float(r) <= 0:
            raise DatasetError(f"sample_rate_hz: expected a positive scalar, got {r!r}")
        rate = float(r)
    return Dataset(X, y, X_test, y_test, classes, channels, rate)


def save_dataset(path: str | Path, X: np.ndarray, y: np.ndarray, *, classes=None, channels=None,
                 sample_rate_hz: float | None = None, X_test=None, y_test=None) -> Path:
    """Write a dataset in the NPZ format (strings as fixed-width unicode, no pickle)."""
    arrays: dict[str, np.ndarray] = {"X": np.asarray(X, np.float32), "y": np.asarray(y)}
    if X_test is not None:
        arrays["X_test"] = np.asarray(X_test, np.float32)
        arrays["y_test"] = np.asarray(y_test)
    if classes is not None:
        arrays["classes"] = np.asarray([str(c) for c in classes])
    if channels is not None:
        arrays["channels"] = np.asarray([str(c) for c in channels])
    if sample_rate_hz is not None:
        arrays["sample_rate_hz"] = np.asarray(float(sample_rate_hz))
    path = Path(path)
    np.savez_compressed(path, **arrays)
    return path if path.suffix == ".npz" else path.with_suffix(path.suffix + ".npz")
