"""numba kernels of the predict path: pure functions on arrays (oracles in fusion.py).

One call per batch replaces ~30 small numpy operations per prediction, which at batch 1
cost more than the hnswlib query itself (measured with cProfile on the predict path).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def fuse_max_similarity(labels, distances, p_head, n_classes, temperature):  # pragma: no cover
    """labels (B, k) int32, distances (B, k) f32, p_head (B, Kh) f64 -> probs (B, K) f64,
    decided (B,) int8: 0 slow, 1 agree, 2 fast; p_fast (B, K) f64.

    Per class the similarity of its nearest neighbour, softmax(sim / temperature) over the
    classes present (the fast distribution ``p_fast``, all zeros for an empty memory; the
    kNN readout), then the hierarchical fusion of `fusion.fuse` (``probs``: the head's
    readout, which knows only its own classes, extended by the kNN's mass elsewhere).
    """
    B, k = labels.shape
    kh = p_head.shape[1]
    probs = np.zeros((B, n_classes))
    p_fast = np.zeros((B, n_classes))
    decided = np.zeros(B, np.int8)
    best = np.empty(n_classes)
    for b in range(B):
        best[:] = -np.inf
        for j in range(k):
            c = labels[b, j]
            s = 1.0 - distances[b, j]
            if s > best[c]:
                best[c] = s
        top = -np.inf
        for c in range(n_classes):
            if best[c] > top:
                top = best[c]
        if top == -np.inf:                       # empty memory: the head alone
            for c in range(kh):
                probs[b, c] = p_head[b, c]
            continue
        total = 0.0
        fast_arg = 0
        for c in range(n_classes):
            if best[c] > -np.inf:
                best[c] = np.exp((best[c] - top) / temperature)
                total += best[c]
            else:
                best[c] = 0.0
            if best[c] > best[fast_arg]:
                fast_arg = c
        for c in range(n_classes):
            p_fast[b, c] = best[c] / total
        head_mass = 0.0
        for c in range(kh):
            head_mass += best[c] / total
        norm = 0.0
        for c in range(kh):
            probs[b, c] = head_mass * p_head[b, c]
            norm += probs[b, c]
        for c in range(kh, n_classes):
            probs[b, c] = best[c] / total
            norm += probs[b, c]
        arg = 0
        for c in range(n_classes):
            probs[b, c] /= norm
            if probs[b, c] > probs[b, arg]:
                arg = c
        if arg >= kh:
            decided[b] = 2
        elif arg == fast_arg:
            decided[b] = 1
    return probs, decided, p_fast


def warmup() -> None:
    fuse_max_similarity(np.zeros((1, 2), np.int32), np.zeros((1, 2), np.float32),
                        np.full((1, 2), 0.5), 3, 0.02)
