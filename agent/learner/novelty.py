"""Open-set scores: how unlike everything known a window is, calibrated on this device.

Two raw scores per latent, each "higher = more novel":

* ``knn``: cosine distance to the nearest stored episode (the episodic memory's view);
* ``schema``: squared Mahalanobis distance to the nearest class mean under the shared
  covariance, per dimension (`SchemaReadout.distance`; the class statistics' view, which
  also covers what eviction forgot).

Neither has a scale that transfers between bundles or devices, so each is turned into a
p-value against a calibration set of the same score on windows of *known* classes. The
calibration sets are small (tens of windows at first), too small for rank (conformal)
p-values at a 5 % rate, so each score is modelled as log-normal on known classes:
``z = (log(s + eps) - mean) / std`` over the calibration set, ``p = 1 - Phi(z)``. The
calibration set starts from the bundle's held-out windows (`exemplars.npz`
``novelty_calibration``, scored by the exporter the way the device scores; bundles without
it: the stored exemplars, leave-one-out) and is then replaced, window by window, by the
device's own labelled windows of classes it has formed (scored before they are learned:
test-then-train), newest ``capacity`` kept. The window's novelty is the Bonferroni
combination ``p = min(1, 2 min(p_knn, p_schema))``; it is flagged when ``p <= target_fa``,
so on windows like the calibration ones (and as log-normal as the model assumes) the
false-alarm rate is at most ``target_fa``. `Prediction.novelty_score` is ``1 - p`` (in
[0, 1]); the threshold is ``1 - target_fa``.

Pure numpy on small arrays; `Learner` updates it under its write lock and reads a tuple
that `add` replaces whole.
"""

from __future__ import annotations

import math

import numpy as np

from agent.errors import StateError

SCORES = ("knn", "schema")
EPS = 1e-6                 # log(score + EPS): a duplicate's cosine distance is 0
MIN_STD = 1e-3             # of the log-scores: a degenerate calibration set is not infinitely sure


_erfc = np.vectorize(math.erfc, otypes=[np.float64])


class NoveltyCalibration:
    """See the module docstring.

    >>> cal = NoveltyCalibration(target_fa=0.05, capacity=100)
    >>> rng = np.random.default_rng(0)
    >>> cal.reset(np.exp(rng.normal(0, 0.3, (100, 2))))           # log-normal known scores
    >>> (cal.novelty(np.array([[1.0, 1.0], [3.0, 1.0]])) >= cal.threshold).tolist()
    [False, True]
    """

    def __init__(self, target_fa: float = 0.05, capacity: int = 256):
        if not 0 < target_fa < 1:
            raise ValueError(f"target_fa={target_fa!r}, expected 0 < fa < 1")
        if capacity < 2:
            raise ValueError(f"capacity={capacity!r}, expected >= 2")
        self.target_fa = float(target_fa)
        self.capacity = int(capacity)
        self._cal = np.zeros((0, len(SCORES)))      # (n, S), oldest first
        self._fit = (np.zeros(len(SCORES)), np.ones(len(SCORES)))   # log-score mean, std

    @property
    def threshold(self) -> float:
        """The `novelty` value above which a window is flagged."""
        return 1.0 - self.target_fa

    def __len__(self) -> int:
        return int(self._cal.shape[0])

    def reset(self, scores: np.ndarray) -> None:
        """Replace the calibration set by ``scores`` (n, S) (the newest ``capacity``)."""
        cal = np.asarray(scores, np.float64).reshape(-1, len(SCORES))[-self.capacity:]
        cal = cal[np.isfinite(cal).all(axis=1)]
        self._set(cal)

    def add(self, scores: np.ndarray) -> None:
        """One known-class window's raw scores (S,)."""
        s = np.asarray(scores, np.float64).reshape(1, len(SCORES))
        if np.isfinite(s).all():
            self._set(np.concatenate([self._cal, s])[-self.capacity:])

    def _set(self, cal: np.ndarray) -> None:
        logs = np.log(np.maximum(cal, 0.0) + EPS)
        fit = ((logs.mean(axis=0), np.maximum(logs.std(axis=0), MIN_STD)) if len(cal) >= 2
               else (np.zeros(len(SCORES)), np.ones(len(SCORES))))
        self._cal, self._fit = cal, fit

    def novelty(self, scores: np.ndarray) -> np.ndarray:
        """Raw scores (B, S) -> (B,) novelty ``1 - p`` in [0, 1] (0 with fewer than two
        calibration windows). A raw score of +inf (a readout that knows nothing yet) is
        left out (its p is 1)."""
        s = np.asarray(scores, np.float64)
        if len(self._cal) < 2:
            return np.zeros(s.shape[0])
        mean, std = self._fit
        finite = np.isfinite(s)
        z = (np.log(np.maximum(np.where(finite, s, 0.0), 0.0) + EPS) - mean) / std   # (B, S)
        p = 0.5 * _erfc(z / np.sqrt(2.0))                                  # 1 - Phi(z)
        p[~finite] = 1.0
        combined = np.minimum(1.0, s.shape[1] * p.min(axis=1))
        return 1.0 - combined

    def state(self) -> list[list[float]]:
        return np.round(self._cal, 6).tolist()

    def restore(self, state) -> None:
        try:
            cal = np.asarray(state, np.float64)
        except (TypeError, ValueError) as exc:
            raise StateError(f"novelty calibration state is malformed ({exc!r})") from None
        if cal.ndim != 2 or cal.shape[1] != len(SCORES) or not np.isfinite(cal).all():
            raise StateError(f"novelty calibration state has shape {cal.shape}, expected "
                             f"(n, {len(SCORES)}) finite scores")
        self.reset(cal)


def raw_scores(queries: np.ndarray, stored: np.ndarray, schema) -> np.ndarray:
    """The raw scores (B, 2) of centred latents ``queries`` (B, d) against centred stored
    episodes ``stored`` (n, d) (exact cosine, where the device asks hnswlib) and a
    `SchemaReadout`: what `Learner` computes per window. The exporter uses it to score a
    bundle's held-out windows the way a device will (``novelty_calibration``)."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-30)
    db = stored / np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-30)
    knn = (1.0 - q @ db.T).min(axis=1) if len(db) else np.full(len(q), np.inf)
    return np.stack([knn, schema.distance(queries)], axis=1)

