"""Input validation shared by the fast system's classes: shapes, dtypes, finiteness.

Every kernel in `kernels` trusts its inputs; these helpers are what stands between a
caller's array and a kernel. Each returns a C-contiguous, writeable array of the exact
dtype the kernels were compiled for, so numba never compiles a new specialization at run
time (a read-only or strided array would be a different numba type).
"""

from __future__ import annotations

import numpy as np

from agent.memory.errors import MemoryInputError


def _kernel_ready(x: np.ndarray, dtype) -> np.ndarray:
    if x.dtype == dtype and x.flags.c_contiguous and x.flags.writeable:
        return x   # the fast path every well-behaved caller takes: no copy
    with np.errstate(over="ignore", invalid="ignore"):   # overflow becomes inf, rejected next
        return np.array(x, dtype=dtype, order="C")


def shape_str(shape: tuple) -> str:
    """``(n, 64)`` for ``(None, 64)``; ``(64,)`` for ``(64,)``."""
    return "(" + ", ".join("n" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def float_array(x, *, name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
    """`x` as a finite float32/float16 array of `shape` (None = any size on that axis)."""
    arr = np.asarray(x)
    if arr.shape != shape and (arr.ndim != len(shape) or any(
            s is not None and a != s for a, s in zip(arr.shape, shape, strict=True))):
        raise MemoryInputError(f"{name} has shape {arr.shape}, expected {shape_str(shape)}")
    if arr.dtype.kind not in "fiu":
        raise MemoryInputError(f"{name} has dtype {arr.dtype}, expected a real float array")
    arr = _kernel_ready(arr, dtype)
    # One float64 reduction: NaN and Inf propagate, and summing finite float32/float16
    # values cannot overflow float64, so a non-finite sum means a non-finite element.
    if not np.isfinite(arr.sum(dtype=np.float64)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise MemoryInputError(
            f"{name} holds a non-finite value ({arr[tuple(bad)]} at index {tuple(int(i) for i in bad)}) "
            f"after conversion to {np.dtype(dtype).name}; NaN/Inf never reach memory")
    return arr


def latent_vector(x, *, name: str, dim: int) -> np.ndarray:
    """`x` as a finite (dim,) float32 vector with a usable norm: the hot path of every query.

    One float64 dot product screens everything (NaN/Inf propagate into it; it cannot
    overflow for float32 inputs); exact checks run only when the screen fails. The norm
    must be nonzero (cosine is undefined) and its square must fit float32, where hnswlib
    normalizes (beyond that it would store a zero vector).
    """
    arr = np.asarray(x)
    if arr.shape != (dim,):
        raise MemoryInputError(f"{name} has shape {arr.shape}, expected ({dim},)")
    if arr.dtype.kind not in "fiu":
        raise MemoryInputError(f"{name} has dtype {arr.dtype}, expected a real float array")
    arr = _kernel_ready(arr, np.float32)
    a64 = arr.astype(np.float64)
    if 0.0 < a64.dot(a64) < 1e38:
        return arr
    arr = float_array(arr, name=name, shape=(dim,))
    if not arr.any():
        raise MemoryInputError(f"{name} is all zeros; cosine distance needs a nonzero latent")
    raise MemoryInputError(f"{name} has norm {np.sqrt(a64.dot(a64)):g}, expected below 1e19 "
                           "(hnswlib normalizes in float32)")


def code_array(x, *, name: str, k: int, n_units: int | None = None) -> np.ndarray:
    """`x` as a sparse code: (k,) int32, distinct unit ids in [0, n_units), sorted ascending."""
    arr = np.asarray(x)
    if arr.shape != (k,):
        raise MemoryInputError(f"{name} has shape {arr.shape}, expected ({k},) active unit ids")
    if arr.dtype.kind not in "iu":
        raise MemoryInputError(f"{name} has dtype {arr.dtype}, expected integer unit ids")
    if k and (arr.min() < 0 or (n_units is not None and arr.max() >= n_units)):
        hi = "" if n_units is None else f" and < {n_units}"
        raise MemoryInputError(f"{name} holds unit id {int(arr.min()) if arr.min() < 0 else int(arr.max())}, "
                               f"expected >= 0{hi}")
    arr = np.sort(_kernel_ready(arr, np.int32))
    if k > 1 and (np.diff(arr) == 0).any():
        raise MemoryInputError(f"{name} repeats unit id {int(arr[1:][np.diff(arr) == 0][0])}, "
                               "expected distinct active units")
    return arr


def int_scalar(x, *, name: str, lo: int = 0, hi: int = 2**31 - 1) -> int:
    if isinstance(x, bool | np.bool_) or not isinstance(x, int | np.integer):
        raise MemoryInputError(f"{name}={x!r} ({type(x).__name__}), expected an int")
    if not lo <= int(x) <= hi:
        raise MemoryInputError(f"{name}={int(x)}, expected {lo} <= {name} <= {hi}")
    return int(x)


def float_scalar(x, *, name: str, lo: float = -np.inf, hi: float = np.inf) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise MemoryInputError(f"{name}={x!r}, expected a real number") from None
    if not np.isfinite(v) or not lo <= v <= hi:
        raise MemoryInputError(f"{name}={v}, expected a finite value in [{lo}, {hi}]")
    return v
