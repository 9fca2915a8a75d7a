"""Fusing the slow system (the bundle's head) with the fast one (episodic memory).

The fast system knows every class it has episodes of, including classes the head has
never seen; the head knows its own classes better. The fusion is hierarchical: the fast
vote decides how much mass goes to the head's classes as a group, and the head splits that
mass among them::

    p[c in head]     = p_fast(head classes) * p_head[c]
    p[c not in head] = p_fast[c]

With an empty memory (or no similar episode) the head decides alone. That is the "head"
readout; the "knn" readout is the fast vote alone, and the "schema" readout (class
prototypes + shared covariance, agent/memory/schema.py) knows every class the memory has
seen but summarises all of them rather than the nearest few. `mix_readouts` pools the
three with weights the device learns from its own labels (agent/learner/trust.py).
`mix_schema` is the fixed two-way pool used before issue 12. Pure functions on arrays, so
they are easy to test against hand-computed cases.
"""

from __future__ import annotations

import numpy as np


def knn_scores(labels: np.ndarray, distances: np.ndarray, n_classes: int,
               power: float) -> np.ndarray:
    """A similarity-weighted vote: ``labels`` (k,) and cosine ``distances`` (k,) of the
    neighbours -> (n_classes,) summing to 1, or all zeros when nothing is similar."""
    sim = np.clip(1.0 - distances.astype(np.float64), 0.0, None) ** power
    scores = np.bincount(labels.astype(np.int64), weights=sim, minlength=n_classes)[:n_classes]
    total = scores.sum()
    return scores / total if total > 0 else scores


def max_similarity_scores(labels: np.ndarray, distances: np.ndarray, n_classes: int,
                          temperature: float) -> np.ndarray:
    """Per class, the cosine similarity of its nearest retrieved episode, as a softmax with
    `temperature` over the classes present among the neighbours (absent classes get 0).

    Unlike a vote, a class with few episodes is not outvoted by a class with many: one
    close episode is enough. Measured on digits (docs/benchmarks.md): 5-shot new-class
    recall 0.60 vs 0.22 for a k=10 similarity-weighted vote.
    """
    best = np.full(n_classes, -np.inf)
    np.maximum.at(best, labels.astype(np.int64), 1.0 - distances.astype(np.float64))
    present = np.isfinite(best)
    if not present.any():
        return np.zeros(n_classes)
    z = np.where(present, best / temperature, -np.inf)
    z -= z[present].max()
    e = np.where(present, np.exp(z), 0.0)
    return e / e.sum()


def mix_fast(knn: np.ndarray, assoc: np.ndarray | None, assoc_weight: float) -> np.ndarray:
    """The fast system's class distribution: the kNN vote, plus the associative readout."""
    if assoc is None or assoc_weight == 0 or assoc.sum() <= 0:
        return knn
    a = np.zeros_like(knn)
    a[: assoc.shape[0]] = assoc[: knn.shape[0]]
    a = a / a.sum()
    if knn.sum() <= 0:
        return a
    return (1.0 - assoc_weight) * knn + assoc_weight * a


def fuse(p_head: np.ndarray, p_fast: np.ndarray) -> tuple[np.ndarray, str]:
    """``p_head`` (Kh,) over the head's classes (indices 0..Kh-1), ``p_fast`` (K,) over
    all classes -> (fused (K,), which system decided: "slow" | "fast" | "agree")."""
    kh, k = p_head.shape[0], p_fast.shape[0]
    out = np.zeros(k, dtype=np.float64)
    if p_fast.sum() <= 0:
        out[:kh] = p_head
        return out, "slow"
    head_mass = p_fast[:kh].sum()
    out[:kh] = head_mass * p_head
    out[kh:] = p_fast[kh:]
    out /= out.sum()
    best = int(np.argmax(out))
    if best >= kh:
        return out, "fast"
    return out, "agree" if int(np.argmax(p_fast)) == best else "slow"


def max_similarity_batch(labels: np.ndarray, distances: np.ndarray, n_classes: int,
                         temperature: float) -> np.ndarray:
    """`max_similarity_scores` for a batch: labels, distances (B, k) -> (B, n_classes)."""
    B = labels.shape[0]
    best = np.full((B, n_classes), -np.inf)
    if labels.shape[1]:
        rows = np.repeat(np.arange(B), labels.shape[1])
        np.maximum.at(best, (rows, labels.reshape(-1).astype(np.int64)),
                      1.0 - distances.reshape(-1).astype(np.float64))
    present = np.isfinite(best)
    z = np.where(present, best / temperature, -np.inf)
    top = np.where(present.any(axis=1), z.max(axis=1, initial=-np.inf), 0.0)
    e = np.where(present, np.exp(z - top[:, None]), 0.0)
    total = e.sum(axis=1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def fuse_batch(p_head: np.ndarray, p_fast: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """`fuse` for a batch: p_head (B, Kh), p_fast (B, K) -> (B, K) and who decided."""
    kh = p_head.shape[1]
    out = np.zeros_like(p_fast, dtype=np.float64)
    has_fast = p_fast.sum(axis=1) > 0
    head_mass = np.where(has_fast, p_fast[:, :kh].sum(axis=1), 1.0)
    out[:, :kh] = head_mass[:, None] * p_head
    out[:, kh:] = np.where(has_fast[:, None], p_fast[:, kh:], 0.0)
    out /= out.sum(axis=1, keepdims=True)
    best = out.argmax(axis=1)
    fast_best = p_fast.argmax(axis=1)
    who = ["fast" if b >= kh else ("agree" if f and fb == b else "slow")
           for b, f, fb in zip(best.tolist(), has_fast.tolist(), fast_best.tolist(), strict=True)]
    return out, who


def mix_schema(probs: np.ndarray, who: list[str], p_schema: np.ndarray,
               weight: float) -> tuple[np.ndarray, list[str]]:
    """Pool the fused distribution ``probs`` (B, K) with the schema's ``p_schema`` (B, K):
    ``(1 - weight) probs + weight p_schema`` (a linear pool; a geometric one measured no
    better). Rows where the schema knows no class are left alone. A row whose winner the
    schema changed is decided by ``"fast"`` (the schema is the memory's).
    """
    has = p_schema.sum(axis=1) > 0                                        # (B,)
    if weight == 0 or not has.any():
        return probs, who
    out = np.where(has[:, None], (1.0 - weight) * probs + weight * p_schema, probs)
    changed = out.argmax(axis=1) != probs.argmax(axis=1)
    return out, [("fast" if c else w) for w, c in zip(who, changed.tolist(), strict=True)]


def mix_readouts(P: np.ndarray, weights: np.ndarray,
                 p_head: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Pool the readouts ``P`` (R, B, K) (`Learner._readouts`: head, knn, schema) linearly
    with ``weights`` (R,) -> (B, K) rows summing to 1, and who decided each row.

    A readout with a row of zeros (it knows nothing yet) is left out of that row and the
    others' weights renormalised. Who decided: ``"fast"`` when the winner is not one of
    the head's ``Kh = p_head.shape[1]`` classes or the bare head's argmax is not the
    winner; otherwise ``"agree"`` when the kNN or schema readout also names it, else
    ``"slow"``.
    """
    has = P.sum(axis=2) > 0                                            # (R, B)
    w = np.where(has, np.asarray(weights, np.float64)[:, None], 0.0)   # (R, B)
    total = w.sum(axis=0)                                              # (B,)
    lone = total <= 0            # no weighted readout has an opinion: any that has one
    if lone.any():
        w[:, lone] = has[:, lone].astype(np.float64)
        total = w.sum(axis=0)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    probs = np.einsum("rb,rbk->bk", w, P)                              # (B, K)
    best = probs.argmax(axis=1)
    kh = p_head.shape[1]
    head_best = p_head.argmax(axis=1)
    others = (P[1:].argmax(axis=2) == best[None]) & has[1:]          # (R-1, B)
    who = ["fast" if b >= kh or hb != b else ("agree" if o else "slow")
           for b, hb, o in zip(best.tolist(), head_best.tolist(), others.any(axis=0).tolist(),
                               strict=True)]
    return probs, who

