"""MiniRocket, the peer a user would pick instead (issue 12): a class-agnostic random-
convolution transform (Dempster et al. 2021) from a maintained library.

* ``minirocket_slda`` (a CL method): sktime's ``MiniRocketMultivariate`` with its
  defaults (10,000 kernels, up to 32 dilations each; ``random_state`` = the seed so a run
  repeats), fitted on the base classes' training windows only; its features
  standardised with the base windows' mean and standard deviation and projected to
  ``MINIROCKET_DIM`` = 512 dimensions by a seeded Gaussian random projection; streaming
  LDA on top (`baselines.StreamingLDA`, the ``slda`` update and novelty score,
  initialised by streaming the base training windows), then the same stream as every
  method. Stores K means and a 512 x 512 covariance. Like the latent baselines, the
  features are computed once up front (batched), so its time per window excludes the
  transform (reported as ``transform_us_per_window``).
* ``minirocket_ridge`` (a joint reference, not a CL method): ``MiniRocketMultivariate``
  fitted on every class's training windows + ``StandardScaler`` +
  ``RidgeClassifierCV(alphas=np.logspace(-3, 3, 10))``, the usual MiniRocket recipe.

(N, F) feature datasets (sklearn digits) are read as 1-channel series of length F.

Why sktime and not aeon: aeon 1.6 pins ``numba < 0.64``, which would pull the device
runtime's numba down; sktime 1.2.0 does not pin numba. It is in the ``train`` and ``dev``
extras only. Its numba kernels compile on first use (about a minute, then cached under
``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import time

import numpy as np

from agent.dataset import Dataset
from export.bench_cl.baselines import StreamingLDA, _base_rows, joint_result
from export.bench_cl.protocol import CLConfig, Method, Split, StreamData

MINIROCKET_DIM = 512
RIDGE_ALPHAS = np.logspace(-3, 3, 10)


def as_series(X: np.ndarray) -> np.ndarray:
    """Windows as sktime's numpy3D panel (N, C, T) float64; (N, F) becomes (N, 1, F)."""
    X = np.asarray(X, dtype=np.float64)
    return X[:, None, :] if X.ndim == 2 else X


def minirocket_transform(seed: int):
    """sktime's MiniRocketMultivariate with its defaults, seeded."""
    from sktime.transformations.panel.rocket import MiniRocketMultivariate

    return MiniRocketMultivariate(random_state=seed)


def transform(rocket, X: np.ndarray, batch: int = 256) -> np.ndarray:
    """MiniRocket features (N, n_features) float64 of windows X, in batches."""
    return np.concatenate([np.asarray(rocket.transform(as_series(X[s:s + batch])),
                                      dtype=np.float64)
                           for s in range(0, len(X), batch)])


class MiniRocketFeatures:
    """MiniRocket fitted on some windows, standardised by their statistics, projected to
    ``dim`` dimensions by a seeded Gaussian matrix (entries N(0, 1/dim))."""

    def __init__(self, seed: int, dim: int = MINIROCKET_DIM):
        self.seed = seed
        self.dim = dim

    def fit(self, X: np.ndarray) -> MiniRocketFeatures:
        self.rocket_ = minirocket_transform(self.seed).fit(as_series(X))
        F = transform(self.rocket_, X)                                    # (n, f)
        self.mean_ = F.mean(axis=0)
        std = F.std(axis=0)
        self.std_ = np.where(std > 1e-8, std, 1.0)         # constant features stay at 0
        rng = np.random.default_rng(self.seed)
        self.projection_ = rng.standard_normal((F.shape[1], self.dim)) / np.sqrt(self.dim)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """(N, dim) float64."""
        return ((transform(self.rocket_, X) - self.mean_) / self.std_) @ self.projection_


def build(name: str, data: StreamData) -> Method:
    if name == "minirocket_slda":
        return MiniRocketSLDA(data)
    raise ValueError(f"unknown MiniRocket baseline {name!r}")


class MiniRocketSLDA(StreamingLDA):
    name = "minirocket_slda"
    description = (f"sktime MiniRocketMultivariate (defaults, fitted on the base classes), "
                   f"standardised, random projection to {MINIROCKET_DIM} dims, streaming LDA")
    stored = (f"running class means and one shared {MINIROCKET_DIM} x {MINIROCKET_DIM} "
              "covariance (no exemplars); the fitted MiniRocket and projection")

    def __init__(self, data: StreamData):
        ds = data.ds
        base = _base_rows(data)
        t0 = time.perf_counter()
        self.features = MiniRocketFeatures(data.config.seed).fit(ds.X[np.sort(base)])
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        F, F_test = self.features.transform(ds.X), self.features.transform(ds.X_test)
        per_window = (time.perf_counter() - t0) / (len(ds.X) + len(ds.X_test))
        super().__init__(F, F_test, ds.y, len(ds.classes), base)
        self._info = {"minirocket_features": len(self.features.mean_),
                      "projected_dim": MINIROCKET_DIM, "fit_s": round(fit_s, 3),
                      "transform_us_per_window": round(1e6 * per_window, 2)}

    def info(self) -> dict:
        return self._info


def minirocket_ridge(ds: Dataset, split: Split, cfg: CLConfig) -> dict:
    """The joint MiniRocket reference: fitted on all classes' training windows."""
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    rocket = minirocket_transform(cfg.seed).fit(as_series(ds.X))
    clf = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=RIDGE_ALPHAS))
    clf.fit(transform(rocket, ds.X), ds.y)
    train_s = time.perf_counter() - t0
    pred = clf.predict(transform(rocket, ds.X_test))
    return joint_result(pred, ds, split,
                        "sktime MiniRocketMultivariate (defaults) on all classes' training "
                        "windows + StandardScaler + RidgeClassifierCV(alphas=logspace(-3, 3, "
                        "10)), offline; acc = mean over tasks like ACC",
                        train_s=round(train_s, 2))
