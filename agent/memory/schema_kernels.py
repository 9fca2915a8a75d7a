"""numba kernel of the schema readout (`agent.memory.schema`): one observation into running
class statistics, with the precision matrix kept current by a rank-1 update.

Shapes: d latent dim, K classes (capacity). Trusts its inputs: `SchemaReadout` validates.
The numpy oracle it is tested against is in tests/agent/memory/test_schema.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def schema_observe(means, counts, scatter, precision, x, label, update_precision):  # pragma: no cover
    """Add one latent to the class statistics, in place.

    means (K, d) f64, counts (K,) f64, scatter (d, d) f64 (pooled within-class sum of
    outer products), precision (d, d) f64 = (scatter + lam I)^-1, x (d,) f64, 0 <= label < K.

    Welford: delta = x - mean_c; scatter += f delta delta^T with f = n_c / (n_c + 1);
    mean_c += delta / (n_c + 1). That scatter change is rank 1, so with
    ``update_precision`` the precision follows exactly (Sherman-Morrison, O(d^2)):
    P -= f (P delta)(P delta)^T / (1 + f delta^T P delta). A class's first latent only
    sets its mean (no within-class spread yet).
    """
    d = x.shape[0]
    n = counts[label]
    if n == 0.0:
        for i in range(d):
            means[label, i] = x[i]
        counts[label] = 1.0
        return
    f = n / (n + 1.0)
    delta = np.empty(d)                                   # (d,)
    for i in range(d):
        delta[i] = x[i] - means[label, i]
    for i in range(d):
        fi = f * delta[i]
        for j in range(d):
            scatter[i, j] += fi * delta[j]
    if update_precision:
        pd = np.empty(d)                                  # (d,) P delta (P symmetric)
        q = 0.0
        for i in range(d):
            s = 0.0
            for j in range(d):
                s += precision[i, j] * delta[j]
            pd[i] = s
            q += delta[i] * s
        g = f / (1.0 + f * q)
        for i in range(d):
            gi = g * pd[i]
            for j in range(d):
                precision[i, j] -= gi * pd[j]
    for i in range(d):
        means[label, i] += delta[i] / (n + 1.0)
    counts[label] = n + 1.0


def warmup() -> None:
    """Compile the kernel for the signature `SchemaReadout` uses."""
    means, counts = np.zeros((2, 3)), np.zeros(2)
    scatter, precision = np.zeros((3, 3)), np.eye(3)
    for x in (np.ones(3), np.arange(3.0)):
        schema_observe(means, counts, scatter, precision, x, 1, True)
