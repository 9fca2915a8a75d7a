"""How much each readout is trusted on this device: a prequential (test-then-train) record.

Every labelled window is first predicted by each readout (the slow head, the kNN over the
episodic memory, the schema / streaming LDA, and "pool": those three pooled with fixed
prior weights, so that where they do better together than apart the ensemble keeps its
gain), then learned. The record keeps, per readout,
the exponentially discounted sum of its hits (argmax == label) on those windows and of its
log-score ``log max(p_r(y), floor)``. The fusion weights are exponentially weighted
averaging (Hedge) over one of them (``score``: "hit", the default, or "log")::

    w_r  ∝  prior_r * exp(eta * (S_r - max_q S_q))        S_r = sum_t decay^(n-t) hit_r(t)

With the log-score, ``eta = 1`` and no discount this is the Bayesian mixture of the
readouts (its log-loss within ``log(R)`` of the best readout's); measured, it favours the
best-calibrated readout (the pool) over the most accurate one, so the default weighs hits:
each window one readout gets right and another does not moves their weight ratio by e.
The discount lets a readout that starts to do well (the head after a sleep consolidated
new classes) win its say back. A readout with prior 0 is off for good.

Pure arithmetic on a few floats: no lock of its own; `Learner` updates it under its write
lock, and `weights()` reads one tuple that `update` replaces whole (safe for a concurrent
prediction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.errors import StateError

READOUTS = ("head", "knn", "schema", "pool")   # pool: the three pooled with their priors
SCORES = ("log", "hit")


@dataclass(frozen=True)
class _Record:
    log_score: np.ndarray        # (R,) discounted sum of log max(p_r(y), floor)
    hits: np.ndarray             # (R,) discounted sum of correct argmaxes
    n: float                     # discounted number of windows scored
    n_total: int                 # windows scored, undiscounted
    weights: np.ndarray          # (R,) the fusion weights these imply


class ReadoutTrust:
    """See the module docstring.

    >>> t = ReadoutTrust(prior=(1, 1, 1), eta=1.0, decay=1.0, names=("a", "b", "c"), score="log")
    >>> for _ in range(5):
    ...     t.update(np.array([0.1, 0.9, 0.5]), np.array([False, True, True]))
    >>> [round(w, 3) for w in t.weights().tolist()]
    [0.0, 0.95, 0.05]
    """

    def __init__(self, prior=(1.0, 1.0, 1.0, 1.0), *, eta: float = 1.0, decay: float = 0.99,
                 floor: float = 1e-3, names: tuple[str, ...] = READOUTS, score: str = "hit"):
        prior = np.asarray(prior, dtype=np.float64)
        if prior.shape != (len(names),) or not np.isfinite(prior).all() or (prior < 0).any() \
                or prior.sum() <= 0:
            raise ValueError(f"prior={prior.tolist()}, expected {len(names)} weights >= 0, "
                             "not all 0")
        self.names = tuple(names)
        self.prior = prior / prior.sum()
        self.eta = float(eta)
        self.decay = float(decay)
        self.floor = float(floor)
        if score not in SCORES:
            raise ValueError(f"score={score!r}, expected one of {SCORES}")
        self.score = score
        R = len(names)
        self._rec = _Record(np.zeros(R), np.zeros(R), 0.0, 0, self.prior.copy())

    def weights(self) -> np.ndarray:
        """(R,) fusion weights summing to 1 (0 for a readout whose prior is 0)."""
        return self._rec.weights

    def update(self, p_true: np.ndarray, correct: np.ndarray) -> None:
        """One labelled window: ``p_true`` (R,) each readout's probability of the true
        label, ``correct`` (R,) whether its argmax was the label."""
        p = np.clip(np.nan_to_num(np.asarray(p_true, np.float64), nan=0.0), self.floor, 1.0)
        r = self._rec
        log_score = self.decay * r.log_score + np.log(p)
        hits = self.decay * r.hits + np.asarray(correct, np.float64)
        self._rec = _Record(log_score, hits, self.decay * r.n + 1.0, r.n_total + 1,
                            self._weights(log_score, hits))

    def _weights(self, log_score: np.ndarray, hits: np.ndarray) -> np.ndarray:
        s = log_score if self.score == "log" else hits
        on = self.prior > 0
        z = np.where(on, self.eta * (s - s[on].max()), -np.inf)
        w = self.prior * np.exp(z)
        return w / w.sum()

    def accuracy(self) -> dict[str, float | None]:
        """Per readout, the discounted fraction of labelled windows it got right."""
        r = self._rec
        return {n: (float(h / r.n) if r.n > 0 else None)
                for n, h in zip(self.names, r.hits.tolist(), strict=True)}

    def summary(self) -> dict:
        """JSON-ready: weights, prequential accuracy and windows scored."""
        return {"weights": dict(zip(self.names, np.round(self.weights(), 4).tolist(),
                                    strict=True)),
                "accuracy": {k: (None if v is None else round(v, 4))
                             for k, v in self.accuracy().items()},
                "windows_scored": self._rec.n_total}

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        """JSON-ready state for a checkpoint's info."""
        r = self._rec
        return {"names": list(self.names), "log_score": r.log_score.tolist(),
                "hits": r.hits.tolist(), "n": r.n, "n_total": r.n_total}

    def restore(self, state: dict) -> None:
        """Put back what `state` returned; StateError naming the problem if it does not fit
        (a checkpoint from a build with other readouts is refused, not guessed at)."""
        try:
            names = tuple(state["names"])
            log_score = np.asarray(state["log_score"], np.float64)
            hits = np.asarray(state["hits"], np.float64)
            n, n_total = float(state["n"]), int(state["n_total"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"readout trust state is malformed ({exc!r})") from None
        R = len(self.names)
        if names != self.names or log_score.shape != (R,) or hits.shape != (R,) \
                or not (np.isfinite(log_score).all() and np.isfinite(hits).all()
                        and np.isfinite(n)) or (log_score > 0).any() or n < 0 or n_total < 0:
            raise StateError(f"readout trust state {state!r} does not fit readouts "
                             f"{list(self.names)}")
        self._rec = _Record(log_score, hits, n, n_total, self._weights(log_score, hits))
