"""What a sleep replays: a held-out split, class-balanced surprise-prioritized draws of
stored episodes, and pseudo-latents for classes with few of them.

* **Held-out slice**: ``round(n_c * fraction)`` episodes of each class c (so a class with
  one or two episodes keeps them all for training), drawn at random.
* **Replay**: `agent.memory.kernels.class_balanced_sample` over the training episodes:
  about equally many draws per class; a share ``surprise_share`` of them proportional to
  surprise (what the model got wrong), the rest uniform (so the well-predicted majority,
  e.g. the bundle's exemplars with surprise 0, is replayed too).
* **Pseudo-latents** (latent-level generative replay): for a class with fewer than
  ``pseudo_below`` training episodes, a share ``pseudo_share`` of its draws is replaced by
  ``mean_c + std_c * eps``, a diagonal Gaussian of its latents. With few episodes the
  variance is shrunk toward the pooled within-class variance of all classes
  (``(n_c var_c + 5 pooled) / (n_c + 5)``, a conjugate-prior style estimate), and draws
  are clipped below at the smallest value seen per unit (post-ReLU latents are >= 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.memory import kernels as memory_kernels

PRIOR_STRENGTH = 5.0     # pseudo-episodes' worth of pooled variance in a class's estimate


@dataclass(frozen=True)
class EpisodeSet:
    """Copies of stored episodes, uncentred (the head's input)."""

    ids: np.ndarray        # (n,) uint64
    latents: np.ndarray    # (n, d) float32
    labels: np.ndarray     # (n,) int64
    surprise: np.ndarray   # (n,) float32

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def subset(self, mask: np.ndarray) -> EpisodeSet:
        return EpisodeSet(self.ids[mask], self.latents[mask], self.labels[mask],
                          self.surprise[mask])

    def concat(self, other: EpisodeSet) -> EpisodeSet:
        return EpisodeSet(*(np.concatenate([a, b]) for a, b in (
            (self.ids, other.ids), (self.latents, other.latents), (self.labels, other.labels),
            (self.surprise, other.surprise))))


def holdout_mask(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) bool: ``round(n_c * fraction)`` random episodes of every class c, at most n_c - 1."""
    held = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        k = min(int(round(rows.shape[0] * fraction)), rows.shape[0] - 1)
        if k > 0:
            held[rng.choice(rows, size=k, replace=False)] = True
    return held


class ReplayStream:
    """Draws replay samples from the training episodes; see the module docstring.

    >>> X, y, rows = ReplayStream(train, n_classes=6, surprise_share=0.5, pseudo_below=20,
    ...                           pseudo_share=0.5, seed=0).draw(1024)   # doctest: +SKIP
    """

    def __init__(self, train: EpisodeSet, n_classes: int, *, surprise_share: float,
                 pseudo_below: int, pseudo_share: float, seed: int):
        if len(train) == 0:
            raise ValueError("no training episodes to replay")
        if train.labels.min() < 0 or train.labels.max() >= n_classes:
            raise ValueError(f"labels outside [0, {n_classes})")
        self.train = train
        self.surprise_share = float(surprise_share)
        self.pseudo_share = float(pseudo_share)
        self._rng = np.random.default_rng(seed)
        self._labels32 = train.labels.astype(np.int32)
        self._valid = np.ones(len(train), dtype=np.bool_)
        self._surprise = np.ascontiguousarray(train.surprise, dtype=np.float32)
        self._uniform = np.ones(len(train), dtype=np.float32)
        self.counts = np.bincount(train.labels, minlength=n_classes)           # (K,)
        self.mean, self.std = _class_stats(train.latents, train.labels, n_classes)
        self.floor = train.latents.min(axis=0)                                  # (d,)
        self.few = (self.counts > 0) & (self.counts < pseudo_below)             # (K,)

    def draw(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n samples: latents (n, d) f32, labels (n,) int64, training row of each real
        sample, -1 for a pseudo-latent (n,) int64. Class-balanced, shuffled."""
        n_surprise = int(round(n * self.surprise_share))
        seeds = self._rng.integers(0, 2**62, size=2)
        rows = np.concatenate([
            memory_kernels.class_balanced_sample(self._labels32, self._valid, self._surprise,
                                                 n_surprise, int(seeds[0])),
            memory_kernels.class_balanced_sample(self._labels32, self._valid, self._uniform,
                                                 n - n_surprise, int(seeds[1])),
        ])
        rows = rows[self._rng.permutation(rows.shape[0])]
        X = self.train.latents[rows].copy()                                     # (n, d)
        y = self.train.labels[rows].copy()                                      # (n,)
        if self.few.any() and self.pseudo_share > 0:
            fake = self.few[y] & (self._rng.random(n) < self.pseudo_share)
            k = int(fake.sum())
            if k:
                eps = self._rng.standard_normal((k, X.shape[1])).astype(np.float32)
                X[fake] = np.maximum(self.mean[y[fake]] + self.std[y[fake]] * eps, self.floor)
                rows[fake] = -1
        return X, y, rows


def _class_stats(latents: np.ndarray, labels: np.ndarray,
                 n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean and shrunk std: (K, d) float32 each (zeros for absent classes)."""
    d = latents.shape[1]
    mean = np.zeros((n_classes, d), np.float64)
    var = np.zeros((n_classes, d), np.float64)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    for c in np.flatnonzero(counts):
        x = latents[labels == c].astype(np.float64)
        mean[c] = x.mean(axis=0)
        var[c] = x.var(axis=0)
    spread = counts >= 2
    pooled = var[spread].mean(axis=0) if spread.any() else np.zeros(d)
    shrunk = (counts[:, None] * var + PRIOR_STRENGTH * pooled) / (counts[:, None] + PRIOR_STRENGTH)
    return mean.astype(np.float32), np.sqrt(shrunk).astype(np.float32)
