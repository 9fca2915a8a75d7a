"""Open-set scores: how unlike everything known a window is, calibrated on this device.

Two raw scores per latent, each "higher = more novel":

* ``knn``: cosine distance to the nearest stored episode (the episodic memory's view);
* ``schema``: squared Mahalanobis distance to the nearest class mean under the shared
  covariance, per dimension (`SchemaReadout.distance`; the class statistics' view, which
  also covers what eviction forgot).

Neither has a scale that transfers between bundles or devices, so each is turned into a
conformal p-value against a calibration set of the same score on windows of *known*
classes: ``p = (1 + #{calibration >= s}) / (n + 1)``. The calibration set starts from the
bundle's exemplars (leave-one-out, set by `Learner`) and is then replaced, window by
window, by the device's own labelled windows of classes it has formed (scored before
they are learned: test-then-train), newest ``capacity`` kept. The window's novelty is the
Bonferroni combination ``p = min(1, 2 min(p_knn, p_schema))``; it is flagged when
``p <= target_fa``, so on windows like the calibration ones the false-alarm rate is at
most ``target_fa``. `Prediction.novelty_score` is ``1 - p`` (in [0, 1]); the threshold is
``1 - target_fa``.

Pure numpy on small arrays; `Learner` updates it under its write lock and reads a tuple
that `add` replaces whole.
"""

from __future__ import annotations

import numpy as np

from agent.errors import StateError

SCORES = ("knn", "schema")


class NoveltyCalibration:
    """See the module docstring.

    >>> cal = NoveltyCalibration(target_fa=0.1, capacity=100)
    >>> cal.reset(np.stack([np.linspace(0, 1, 99), np.linspace(0, 1, 99)], axis=1))
    >>> cal.novelty(np.array([[0.5, 0.5], [2.0, 0.1]])).round(3).tolist()
    [0.0, 0.98]
    """

    def __init__(self, target_fa: float = 0.05, capacity: int = 256):
        if not 0 < target_fa < 1:
            raise ValueError(f"target_fa={target_fa!r}, expected 0 < fa < 1")
        if capacity < 2:
            raise ValueError(f"capacity={capacity!r}, expected >= 2")
        self.target_fa = float(target_fa)
        self.capacity = int(capacity)
        self._cal = np.zeros((0, len(SCORES)))      # (n, S), oldest first
        self._sorted = self._cal                    # each column sorted ascending

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
        self._cal, self._sorted = cal, np.sort(cal, axis=0)

    def novelty(self, scores: np.ndarray) -> np.ndarray:
        """Raw scores (B, S) -> (B,) novelty ``1 - p`` in [0, 1] (0 without calibration).
        A raw score of +inf (a readout that knows nothing yet) gives p of that score 1."""
        s = np.asarray(scores, np.float64)
        srt = self._sorted
        n = srt.shape[0]
        if n == 0:
            return np.zeros(s.shape[0])
        p = np.empty_like(s)
        for j in range(s.shape[1]):
            below = np.searchsorted(srt[:, j], s[:, j], side="left")     # #{cal < s}
            p[:, j] = (1.0 + n - below) / (n + 1.0)
        p[~np.isfinite(s)] = 1.0
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
