"""Continual-learning metrics on an accuracy matrix.

``R[i, j]`` is the accuracy on task ``j``'s test classes after training through task
``i`` (task 0 = the base classes), for ``j <= i``; entries above the diagonal are NaN
(not yet seen). With ``T`` the last task:

* ACC (final average accuracy): ``mean_j R[T, j]``;
* BWT (backward transfer, Lopez-Paz & Ranzato 2017): ``mean_{j<T} R[T, j] - R[j, j]``,
  negative when learning later tasks hurt earlier ones;
* forgetting (Chaudhry et al. 2018): ``mean_{j<T} max_{j<=i<T} R[i, j] - R[T, j]``, the
  drop from the best accuracy a task ever had to its final one.

>>> R = accuracy_matrix([[1.0], [0.8, 0.9]])
>>> round(average_accuracy(R), 3), round(backward_transfer(R), 3), round(forgetting(R), 3)
(0.85, -0.2, 0.2)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy_matrix(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """A lower-triangular ``(T+1, T+1)`` float64 matrix from rows of growing length
    (row ``i`` holds ``R[i, 0..i]``); NaN above the diagonal."""
    n = len(rows)
    R = np.full((n, n), np.nan)
    for i, row in enumerate(rows):
        if len(row) != i + 1:
            raise ValueError(f"row {i} has {len(row)} entries, expected {i + 1}")
        R[i, : i + 1] = row
    return R


def _check(R: np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 1:
        raise ValueError(f"accuracy matrix has shape {R.shape}, expected square (T+1, T+1)")
    if np.isnan(R[np.tril_indices(len(R))]).any():
        raise ValueError("accuracy matrix has NaN on or below the diagonal")
    return R


def average_accuracy(R: np.ndarray) -> float:
    """ACC: the mean over tasks of the final row."""
    R = _check(R)
    return float(R[-1].mean())


def backward_transfer(R: np.ndarray) -> float:
    """BWT: mean over earlier tasks of final minus just-learned accuracy (0 with one task)."""
    R = _check(R)
    T = len(R) - 1
    if T == 0:
        return 0.0
    return float(np.mean([R[T, j] - R[j, j] for j in range(T)]))


def task_forgetting(R: np.ndarray, j: int) -> float:
    """Forgetting of task ``j``: its best accuracy before the last task minus its final one."""
    R = _check(R)
    T = len(R) - 1
    if not 0 <= j < T:
        raise ValueError(f"task {j}: forgetting is defined for tasks 0..{T - 1}")
    return float(R[j:T, j].max() - R[T, j])


def forgetting(R: np.ndarray) -> float:
    """Average forgetting over every task but the last (0 with one task)."""
    R = _check(R)
    T = len(R) - 1
    if T == 0:
        return 0.0
    return float(np.mean([task_forgetting(R, j) for j in range(T)]))


def curve(R: np.ndarray) -> list[float]:
    """Average accuracy over the tasks seen so far, after each task: ``mean_{j<=i} R[i, j]``
    (its last value is ACC)."""
    R = _check(R)
    return [float(R[i, : i + 1].mean()) for i in range(len(R))]


def to_json(R: np.ndarray) -> list[list[float | None]]:
    """The matrix as nested lists, NaN as None (JSON has no NaN)."""
    return [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in np.asarray(R)]


def summary(R: np.ndarray) -> dict:
    """Every metric of one method's matrix, JSON-ready (fractions, not percent)."""
    R = _check(R)
    T = len(R) - 1
    return {"acc": round(average_accuracy(R), 6), "bwt": round(backward_transfer(R), 6),
            "forgetting": round(forgetting(R), 6), "acc_matrix": to_json(R),
            "base_acc": round(float(R[T, 0]), 6),
            "base_forgetting": round(task_forgetting(R, 0), 6) if T > 0 else 0.0,
            "curve": [round(v, 6) for v in curve(R)]}


def auroc(scores, positive) -> float | None:
    """Area under the ROC curve of ``scores`` for telling the ``positive`` items (bool)
    from the others, higher score = more positive: the probability that a random
    positive outscores a random negative, ties counted half (the Mann-Whitney U over
    ``n_pos * n_neg``). None when either side is empty; NaN scores raise ValueError.

    >>> auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    0.75
    >>> auroc([1.0, 1.0], [True, False])
    0.5
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(positive, dtype=bool).ravel()
    if s.shape != pos.shape:
        raise ValueError(f"{len(s)} scores for {len(pos)} labels")
    if np.isnan(s).any():
        raise ValueError("NaN score: AUROC needs comparable scores")
    n_pos = int(pos.sum())
    n_neg = len(s) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="stable")
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)    # 1-based, ties averaged
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def mean_or_none(values) -> float | None:
    """The mean of the values that are not None (None if there are none), rounded."""
    vals = [v for v in values if v is not None]
    return round(float(np.mean(vals)), 6) if vals else None
