"""river's online learners on raw inputs (flattened windows as ``{feature index: value}``).

They have no base model, so each first learns the base classes' training windows in one
seeded pass (the same data the base bundle was trained on, seen once), then the stream
like every other method. Windows are turned into dicts once, up front; the time per
window is river's ``learn_one`` alone.

* ``river_softmax``: ``preprocessing.StandardScaler() | linear_model.SoftmaxRegression()``
  (river's defaults: SGD, lr 0.01): a linear model on standardized inputs.
* ``river_knn``: ``neighbors.KNNClassifier(n_neighbors=5, engine=LazySearch(window_size=W))``
  (exact search over the last W samples, distance-weighted vote), W = the memory budget,
  capped at ``river_max_cells / n_features`` (see `CLConfig`). A FIFO window: the base
  classes leave it once W stream windows have arrived.
* ``river_tree``: ``tree.HoeffdingTreeClassifier()`` with river's defaults.
"""

from __future__ import annotations

import time

import numpy as np

from export.bench_cl.protocol import Method, StreamData


def _dicts(X: np.ndarray) -> list[dict[int, float]]:
    flat = X.reshape(len(X), -1).astype(np.float64)
    return [dict(enumerate(row)) for row in flat.tolist()]


def knn_window(memory: int, n_features: int, max_cells: int) -> int:
    """The kNN's window: the memory budget, unless that makes a query too slow."""
    return max(1, min(memory, max_cells // max(n_features, 1)))


def build(name: str, data: StreamData) -> Method:
    from river import linear_model, neighbors, preprocessing, tree

    cfg = data.config
    n_features = int(np.prod(data.ds.input_shape))
    if name == "river_softmax":
        model = preprocessing.StandardScaler() | linear_model.SoftmaxRegression()
        return RiverMethod(name, model, data,
                           "river StandardScaler | SoftmaxRegression (SGD lr 0.01) on raw inputs",
                           "nothing (the weights only)")
    if name == "river_knn":
        w = knn_window(cfg.memory, n_features, cfg.river_max_cells)
        model = neighbors.KNNClassifier(n_neighbors=5,
                                        engine=neighbors.LazySearch(window_size=w))
        capped = "" if w == cfg.memory else f" (capped from {cfg.memory}: {n_features} features)"
        return RiverMethod(name, model, data,
                           f"river KNNClassifier(k=5, LazySearch window {w}) on raw inputs",
                           f"FIFO window of the last {w} raw windows{capped}",
                           extra={"window_size": w})
    if name == "river_tree":
        return RiverMethod(name, tree.HoeffdingTreeClassifier(), data,
                           "river HoeffdingTreeClassifier (defaults) on raw inputs",
                           "the tree's leaf statistics (no exemplars)")
    raise ValueError(f"unknown river baseline {name!r}")


class RiverMethod(Method):
    def __init__(self, name: str, model, data: StreamData, description: str, stored: str,
                 extra: dict | None = None):
        self.name, self.model, self.description, self.stored = name, model, description, stored
        self.y = data.ds.y
        self.X = _dicts(data.ds.X)
        self.X_test = _dicts(data.ds.X_test)
        base = np.flatnonzero(np.isin(self.y, data.split.tasks[0]))
        t0 = time.perf_counter()
        for r in np.random.default_rng(data.config.seed).permutation(base).tolist():
            self.model.learn_one(self.X[r], int(self.y[r]))
        self._info = {"base_pass_windows": int(len(base)),
                      "base_pass_s": round(time.perf_counter() - t0, 3), **(extra or {})}

    def learn_one(self, row: int) -> None:
        self.model.learn_one(self.X[row], int(self.y[row]))

    def predict(self, rows: np.ndarray) -> np.ndarray:
        out = np.full(len(rows), -1, dtype=np.int64)
        for i, r in enumerate(rows.tolist()):
            p = self.model.predict_one(self.X_test[r])
            if p is not None:
                out[i] = int(p)
        return out

    def info(self) -> dict:
        return self._info
