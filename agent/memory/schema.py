"""Schema readout: running class means and one shared covariance of every latent the
memory has learned, read out as Gaussian class posteriors (streaming LDA, Hayes & Kanan
2020).

Where the episodes are instances, this is the abstraction over them: one prototype per
class and the shape of the spread around it (in memory terms a "schema", which keeps what
evicted episodes taught). It costs O(K d + d^2) whatever the number of episodes.

State: per class the count n_c and mean mu_c; the pooled within-class scatter
A = sum_c sum_i (x_i - mu_c)(x_i - mu_c)^T; the precision P = (A + lam I)^-1, kept
current per observation by a rank-1 update (`schema_kernels.schema_observe`) and
recomputed exactly, with ``lam = shrinkage * trace(A) / d``, every ``refresh_every``
observations (so rounding never accumulates and the shrinkage follows the data's scale).

Posterior (equal class priors, as streaming LDA): with Sigma^-1 = (N - K_seen) P,
``score_c(x) = x Sigma^-1 mu_c - mu_c Sigma^-1 mu_c / 2`` and
``p = softmax(score / temperature)`` over the classes with at least one observation.

The statistics can also come from elsewhere: `seed_stats` replaces them with those of a
set of latents summarised offline (the bundle's base training latents: ``exemplars.npz``
``class_counts``, ``class_means``, ``class_scatter``), which is the same state, up to
rounding, as observing those latents one by one (`check_stats` validates such arrays).

Not thread-safe on its own: `EpisodicMemory` calls it under its lock.
"""

from __future__ import annotations

import numpy as np

from agent.errors import ConfigError
from agent.memory import schema_kernels
from agent.memory.errors import MemoryInputError, MemoryStateError

STATE_KEYS = ("counts", "means", "scatter")
SYMMETRY_RTOL = 1e-6             # of the scatter's largest diagonal entry


def check_stats(counts: np.ndarray, means: np.ndarray, scatter: np.ndarray,
                dim: int | None = None) -> str | None:
    """What is wrong with these class statistics, or None: counts (K,) finite >= 0, means
    (K, d) finite, scatter (d, d) finite, symmetric, non-negative diagonal; d == `dim`
    when given. Each problem names the array."""
    arrays = {"counts": counts, "means": means, "scatter": scatter}
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu":
            return f"{name} is {getattr(a, 'dtype', type(a).__name__)}, expected a numeric array"
    d = dim if dim is not None else (scatter.shape[0] if scatter.ndim == 2 else -1)
    k = counts.shape[0] if counts.ndim == 1 else -1
    want = {"counts": (k,), "means": (k, d), "scatter": (d, d)}
    for name, a in arrays.items():
        if counts.ndim != 1 or a.shape != want[name]:
            return (f"{name} has shape {a.shape}; expected counts (K,), means (K, d), scatter "
                    f"(d, d) with d = {dim if dim is not None else 'scatter.shape[0]'}")
        if not np.isfinite(a).all():
            return f"{name} holds non-finite values"
    if (counts < 0).any():
        return f"counts holds a negative value ({counts.min()!r})"
    diag = np.diag(scatter)
    if (diag < 0).any():
        return f"scatter has a negative diagonal entry ({diag.min()!r})"
    asym = float(np.abs(scatter - scatter.T).max(initial=0.0))
    if asym > SYMMETRY_RTOL * max(float(diag.max(initial=0.0)), 1e-12):
        return f"scatter is not symmetric (|S - S^T| up to {asym:.3g})"
    return None


class SchemaReadout:
    """See the module docstring.

    >>> s = SchemaReadout(dim=2)
    >>> for x, y in (([0, 0], 0), ([0.2, 0], 0), ([4, 4], 1), ([4.2, 4], 1)):
    ...     s.observe(np.array(x, float), y)
    >>> s.posterior(np.array([[3.9, 4.1]]), n_classes=2).argmax(axis=1).tolist()
    [1]
    """

    def __init__(self, dim: int, shrinkage: float = 1e-2, refresh_every: int = 256):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"schema dim={dim!r}, expected an int >= 1")
        if not isinstance(shrinkage, int | float) or not 0 < shrinkage <= 1:
            raise ConfigError(f"schema shrinkage={shrinkage!r}, expected 0 < shrinkage <= 1")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) \
                or refresh_every < 1:
            raise ConfigError(f"schema refresh_every={refresh_every!r}, expected an int >= 1")
        self.dim = dim
        self.shrinkage = float(shrinkage)
        self.refresh_every = refresh_every
        self.counts_ = np.zeros(8)                        # (K cap,) f64
        self.means_ = np.zeros((8, dim))                  # (K cap, d)
        self.scatter_ = np.zeros((dim, dim))              # (d, d)
        self.precision_ = np.eye(dim)                     # (d, d), exact or rank-1 tracked when _since_exact >= 0
        self._since_exact = -1                            # observations since P was exact; -1: never
        self._readout: tuple | None = None                # cached (seen, W, b)

    # ------------------------------------------------------------------ learning

    def observe(self, x: np.ndarray, label: int) -> None:
        """One latent (d,) of class `label` (an int >= 0). The caller validated x."""
        if label >= self.counts_.shape[0]:
            self._grow(label + 1)
        track = 0 <= self._since_exact < self.refresh_every
        schema_kernels.schema_observe(self.means_, self.counts_, self.scatter_,
                                      self.precision_, np.asarray(x, np.float64), int(label),
                                      track)
        self._since_exact = self._since_exact + 1 if track else -1
        self._readout = None

    def seed_stats(self, counts: np.ndarray, means: np.ndarray, scatter: np.ndarray) -> None:
        """Replace the statistics with those of latents summarised elsewhere: counts (K,)
        per class (0: class not seen; its means row is ignored), means (K, d), the pooled
        within-class scatter (d, d) as in the module docstring. The readout then answers as
        if it had observed those latents one by one, and `observe` continues from there.

        What was observed before is dropped (the statistics must already include it, e.g.
        the bundle's, which cover the exemplars seeded into the memory: no double count).
        Bad arrays raise MemoryInputError naming the array.

        >>> s = SchemaReadout(dim=2)
        >>> s.seed_stats(np.array([2, 2]), np.array([[0.1, 0], [4.1, 4]]), 0.02 * np.eye(2))
        >>> s.posterior(np.array([[3.9, 4.1]]), n_classes=2).argmax(axis=1).tolist()
        [1]
        """
        problem = check_stats(counts, means, scatter, self.dim)
        if problem:
            raise MemoryInputError(f"schema statistics: {problem}")
        counts = np.asarray(counts, dtype=np.float64)
        k = counts.shape[0]
        self.counts_ = np.zeros(max(k, 8))
        self.means_ = np.zeros((max(k, 8), self.dim))
        self.counts_[:k] = counts
        self.means_[:k] = np.where(counts[:, None] > 0, means, 0.0)
        scatter = np.asarray(scatter, dtype=np.float64)
        self.scatter_ = np.ascontiguousarray(0.5 * (scatter + scatter.T))
        self.precision_ = np.eye(self.dim)
        self._since_exact = -1                       # the next read recomputes P exactly
        self._readout = None

    def _grow(self, n: int) -> None:
        k = max(n, 2 * self.counts_.shape[0])
        counts, means = np.zeros(k), np.zeros((k, self.dim))
        counts[: self.counts_.shape[0]] = self.counts_
        means[: self.means_.shape[0]] = self.means_
        self.counts_, self.means_ = counts, means

    def refresh(self) -> None:
        """Recompute the precision exactly now (and the shrinkage from the current scatter);
        reads do it every ``refresh_every`` observations anyway."""
        trace = float(np.trace(self.scatter_))
        lam = self.shrinkage * trace / self.dim if trace > 0 else 1.0
        self.precision_ = np.linalg.inv(self.scatter_ + lam * np.eye(self.dim))
        self.precision_ = 0.5 * (self.precision_ + self.precision_.T)
        self._since_exact = 0
        self._readout = None

    # ------------------------------------------------------------------ reading

    def n_observed(self) -> int:
        return int(self.counts_.sum())

    def posterior(self, latents: np.ndarray, n_classes: int,
                  temperature: float = 1.0) -> np.ndarray:
        """latents (B, d) -> (B, n_classes) f64 rows summing to 1 over the classes observed
        (< n_classes), all zeros when none is."""
        return self.posterior_and_distance(latents, n_classes, temperature)[0]

    def posterior_and_distance(self, latents: np.ndarray, n_classes: int,
                               temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """`posterior` and `distance` from one pass over the class scores (the predict
        path needs both: the LDA scores are computed once)."""
        B = latents.shape[0]
        out = np.zeros((B, n_classes))
        seen, W, b = self._weights()
        if not seen.shape[0]:
            return out, np.full(B, np.inf)
        x = latents.astype(np.float64)                                      # (B, d)
        scores = x @ W.T + b                                                # (B, k)
        dof = max(float(self.counts_.sum()) - seen.shape[0], 1.0)
        quad = dof * np.einsum("bd,de,be->b", x, self.precision_, x)        # (B,)
        dist = np.maximum(quad - 2.0 * scores.max(axis=1), 0.0) / self.dim
        seen_here = seen < n_classes
        if seen_here.any():
            z = scores[:, seen_here] / temperature
            z -= z.max(axis=1, keepdims=True)
            e = np.exp(z)
            out[:, seen[seen_here]] = e / e.sum(axis=1, keepdims=True)
        return out, dist

    def distance(self, latents: np.ndarray) -> np.ndarray:
        """latents (B, d) -> (B,) the squared Mahalanobis distance to the nearest class
        mean under the shared covariance, divided by d (about 1 for a latent like the
        training ones; +inf before any observation). An open-set score: far from every
        class the schema knows. Uses the readout's own weights:
        ``dof (x - mu_c) P (x - mu_c) = dof x P x - 2 (W_c x + b_c)``."""
        seen, d2 = self.class_distances(latents)
        if not seen.shape[0]:
            return np.full(latents.shape[0], np.inf)
        return d2.min(axis=1)

    def class_distances(self, latents: np.ndarray,
                        leave_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(seen classes (k,), squared Mahalanobis distance per dimension to each of their
        means (B, k)).

        With ``leave_out`` (B,) class labels: each latent is one the statistics include,
        and the distances are the ones it would have if it had not been observed (exact
        leave-one-out, for calibrating on training latents). Its class mean moves by
        ``r / (n - 1)`` (r = x - mu_c) and the scatter loses ``c r r^T`` (c = n / (n - 1));
        with h = r P r and g_k = r P (x - mu_k), Sherman-Morrison gives
        ``(x - mu_k) P_-i (x - mu_k) = q_k + c g_k^2 / (1 - c h)`` (for the own class,
        ``c^2 h / (1 - c h)``), with one degree of freedom less. Without it, a latent the
        covariance was fitted on looks much closer than a new one once d is a sizeable
        fraction of the number of latents (measured: 1.0 vs 1.1-1.9 per dimension at d =
        256 from 360 latents). A class of one, or a latent the fit cannot do without
        (c h >= 1), gets +inf for its own class.
        """
        seen, W, b = self._weights()
        x = latents.astype(np.float64)                                      # (B, d)
        if not seen.shape[0]:
            return seen, np.zeros((x.shape[0], 0))
        dof = max(float(self.counts_.sum()) - seen.shape[0], 1.0)
        P = self.precision_
        quad = np.einsum("bd,de,be->b", x, P, x)                            # (B,)
        q = np.maximum(quad[:, None] - 2.0 * (x @ W.T + b) / dof, 0.0)    # (B, k) x P x etc.
        if leave_out is None:
            return seen, dof * q / self.dim
        col = np.searchsorted(seen, leave_out)
        col = np.minimum(col, seen.shape[0] - 1)
        ok = seen[col] == leave_out                                          # (B,)
        mu = self.means_[seen]                                               # (k, d)
        r = x - mu[col]                                                      # (B, d)
        rP = r @ P                                                           # (B, d)
        h = (rP * r).sum(axis=1)                                             # (B,)
        n = self.counts_[seen][col]
        c = n / np.maximum(n - 1.0, 1.0)
        g = rP @ mu.T                                                        # (B, k) r P mu_k
        g = (rP * x).sum(axis=1)[:, None] - g                                # r P (x - mu_k)
        denom = 1.0 - c * h
        fine = ok & (n > 1) & (denom > 1e-9)
        safe = np.where(fine, denom, 1.0)
        loo = q + (c / safe)[:, None] * g ** 2                              # (B, k)
        own = c ** 2 * h / safe
        rows = np.arange(x.shape[0])
        loo[rows, col] = np.where(fine, own, np.inf)
        loo = np.where(ok[:, None], loo, q)
        return seen, max(dof - 1.0, 1.0) * loo / self.dim

    def _weights(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._readout is None:
            if self._since_exact < 0 or self._since_exact >= self.refresh_every:
                self.refresh()
            seen = np.flatnonzero(self.counts_ > 0)
            dof = max(float(self.counts_.sum()) - seen.shape[0], 1.0)
            mu = self.means_[seen]                                         # (k, d)
            W = dof * (mu @ self.precision_)                               # (k, d)
            b = -0.5 * (W * mu).sum(axis=1)                                # (k,)
            self._readout = (seen, W, b)
        return self._readout

    # ------------------------------------------------------------------ state

    def state_arrays(self) -> dict[str, np.ndarray]:
        """counts (K,), means (K, d), scatter (d, d): the precision is recomputed on load."""
        k = int(np.flatnonzero(self.counts_)[-1]) + 1 if self.counts_.any() else 0
        return {"counts": self.counts_[:k].copy(), "means": self.means_[:k].copy(),
                "scatter": self.scatter_.copy()}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], shrinkage: float = 1e-2,
                   refresh_every: int = 256) -> SchemaReadout:
        """Rebuild from `state_arrays()`; shapes and values are checked (MemoryStateError)."""
        scatter = np.asarray(arrays["scatter"], dtype=np.float64)
        counts = np.asarray(arrays["counts"], dtype=np.float64)
        means = np.asarray(arrays["means"], dtype=np.float64)
        d = scatter.shape[0] if scatter.ndim == 2 else -1
        if scatter.shape != (d, d) or counts.ndim != 1 or means.shape != (counts.shape[0], d):
            raise MemoryStateError(f"schema state has counts {counts.shape}, means {means.shape}, "
                                   f"scatter {scatter.shape}; expected (K,), (K, d), (d, d)")
        if not (np.isfinite(scatter).all() and np.isfinite(means).all()
                and np.isfinite(counts).all() and (counts >= 0).all()):
            raise MemoryStateError("schema state holds non-finite values or negative counts")
        self = cls(d, shrinkage, refresh_every)
        if counts.shape[0]:
            self._grow(counts.shape[0])
        self.counts_[: counts.shape[0]] = counts
        self.means_[: counts.shape[0]] = means
        self.scatter_ = np.array(scatter, order="C")
        return self
