"""Baselines on the base bundle's frozen latents, and the joint upper bound.

* ``ncm``: nearest class mean (Euclidean) on the latents; the means start from every
  base training latent and are updated by each stream window. Stores K means, no
  exemplars. Novelty: the distance to the nearest mean.
* ``slda``: streaming LDA (Hayes & Kanan 2020): running class means and one shared
  covariance, updated per window; predicts with ``((1 - e) S + e I)^-1``, shrinkage
  e = 1e-4. Initialised by streaming the base training latents through the same update.
  Stores K means and a d x d covariance, no exemplars. Novelty: the smallest
  Mahalanobis distance to a class mean under that precision. (`minirocket_slda` is the
  same class on MiniRocket features, `export.bench_cl.minirocket`.)

ncm flags a window as novel when its score exceeds the 95th percentile of the base
training windows' scores, computed once after initialisation (a nominal 5 % false-alarm
rate; in-sample, so the rate on held-out windows is higher). slda (and minirocket_slda)
report the score only, no flags: the same in-sample calibration of a Mahalanobis
distance under a covariance fitted on those very windows (near-singular with few
windows per dimension, shrinkage 1e-4) puts the threshold far below held-out distances:
every test window, known or new, was flagged on a small set.
* ``finetune``: the bundle's head (``head.npz``) in torch, with one new output row per
  class (rows of classes not seen yet are masked out of the softmax), trained by plain
  SGD on each stream window alone (batch 1). Stores nothing: catastrophic forgetting is
  the expected outcome.
* ``replay``: the same head, each stream step one SGD step on the new window plus a
  replay mini-batch drawn uniformly from a class-balanced reservoir (CBRS, Chrysakis &
  Moens 2020) of M latents, filled first with the base training latents.

The torch baselines run on one thread, seeded; the latents are computed once (batched)
by the bundle's ``encoder.onnx``, so their time per window excludes the encoder.
"""

from __future__ import annotations

import time

import numpy as np

from agent.dataset import Dataset
from export.bench_cl.protocol import CLConfig, Method, Split, StreamData

SLDA_SHRINKAGE = 1e-4
FINETUNE_LR = 0.01
REPLAY_LR = 0.1
REPLAY_BATCH = 10
NOVELTY_FALSE_ALARM = 0.05     # ncm's flags: calibrated on the base training windows


def build(name: str, data: StreamData) -> Method:
    if name == "ncm":
        return NearestClassMean.on_latents(data)
    if name == "slda":
        return StreamingLDA.on_latents(data)
    if name == "finetune":
        return HeadSGD(data, replay=False)
    if name == "replay":
        return HeadSGD(data, replay=True)
    raise ValueError(f"unknown baseline {name!r}")


def _base_rows(data: StreamData) -> np.ndarray:
    """The base classes' training rows, in a seeded order."""
    rows = np.flatnonzero(np.isin(data.ds.y, data.split.tasks[0]))
    return np.random.default_rng(data.config.seed).permutation(rows)


def novelty_threshold(base_scores: np.ndarray) -> float:
    """The score above which a window is flagged novel: the 95th percentile of the base
    training windows' scores (a 5 % false-alarm rate on the data the method was
    initialised with; in-sample, so on held-out windows of seen classes it is higher)."""
    return float(np.quantile(base_scores, 1 - NOVELTY_FALSE_ALARM))


NOVELTY_RULE = ("score above the 95th percentile of the base training windows' scores "
                "(calibrated once after initialisation, in-sample: a nominal 5 % false-alarm "
                "rate)")


class NearestClassMean(Method):
    """Running class means of feature vectors (float64); novelty = the Euclidean distance
    to the nearest class mean."""

    name = "ncm"
    description = "frozen latent + nearest class mean (Euclidean)"
    stored = "one running mean per class (no exemplars)"
    novelty_rule = NOVELTY_RULE

    def __init__(self, Z: np.ndarray, Z_test: np.ndarray, y: np.ndarray, n_classes: int,
                 base_rows: np.ndarray):
        self.Z, self.Z_test, self.y = Z.astype(np.float64), Z_test.astype(np.float64), y
        self.sums = np.zeros((n_classes, self.Z.shape[1]))         # (K, d)
        self.counts = np.zeros(n_classes)
        np.add.at(self.sums, self.y[base_rows], self.Z[base_rows])
        np.add.at(self.counts, self.y[base_rows], 1)
        self.threshold = novelty_threshold(self._distances(self.Z[base_rows])[1].min(axis=1))

    @classmethod
    def on_latents(cls, data: StreamData) -> NearestClassMean:
        return cls(data.Z, data.Z_test, data.ds.y, len(data.ds.classes), _base_rows(data))

    def learn_one(self, row: int) -> None:
        c = self.y[row]
        self.sums[c] += self.Z[row]
        self.counts[c] += 1

    def _distances(self, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The classes with a mean (k,) and the Euclidean distances to their means (B, k)."""
        known = np.flatnonzero(self.counts > 0)
        means = self.sums[known] / self.counts[known, None]                 # (k, d)
        d2 = (Z ** 2).sum(1)[:, None] + (means ** 2).sum(1)[None] - 2 * Z @ means.T
        return known, np.sqrt(np.maximum(d2, 0.0))                          # (B, k)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        known, dist = self._distances(self.Z_test[rows])
        return known[dist.argmin(axis=1)]

    def novelty(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score = self._distances(self.Z_test[rows])[1].min(axis=1)
        return score, score > self.threshold


class StreamingLDA(Method):
    """Streaming LDA on feature vectors; novelty = the smallest Mahalanobis distance to a
    class mean under the shared (shrunk) covariance."""

    name = "slda"
    description = (f"frozen latent + streaming LDA (Hayes & Kanan 2020), shrinkage "
                   f"{SLDA_SHRINKAGE:g}")
    stored = "running class means and one shared covariance (no exemplars)"
    novelty_rule = ("no flags (score only): an in-sample threshold on the Mahalanobis "
                    "distance flags every held-out window")

    def __init__(self, Z: np.ndarray, Z_test: np.ndarray, y: np.ndarray, n_classes: int,
                 base_rows: np.ndarray):
        """Initialised by streaming ``base_rows`` of ``Z`` through `learn_one`."""
        self.Z, self.Z_test, self.y = Z.astype(np.float64), Z_test.astype(np.float64), y
        d = self.Z.shape[1]
        self.mu = np.zeros((n_classes, d))       # (K, d)
        self.counts = np.zeros(n_classes)
        self.S = np.zeros((d, d))                # shared covariance
        self.n = 0
        self._fit: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        for r in base_rows:
            self.learn_one(int(r))

    @classmethod
    def on_latents(cls, data: StreamData) -> StreamingLDA:
        return cls(data.Z, data.Z_test, data.ds.y, len(data.ds.classes), _base_rows(data))

    def learn_one(self, row: int) -> None:
        z, c = self.Z[row], self.y[row]
        dz = z - self.mu[c]                       # against the class mean before this sample
        self.S = (self.n * self.S + np.outer(dz, dz) * self.n / (self.n + 1)) / (self.n + 1)
        self.mu[c] += dz / (self.counts[c] + 1)
        self.counts[c] += 1
        self.n += 1
        self._fit = None

    def _fitted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(known classes (k,), W = mu P (k, d), b (k,), precision P (d, d))."""
        if self._fit is None:
            known = np.flatnonzero(self.counts > 0)
            d = self.S.shape[0]
            P = np.linalg.inv((1 - SLDA_SHRINKAGE) * self.S + SLDA_SHRINKAGE * np.eye(d))
            W = self.mu[known] @ P                                            # (k, d)
            b = -0.5 * (W * self.mu[known]).sum(axis=1)                       # (k,)
            self._fit = (known, W, b, P)
        return self._fit

    def predict(self, rows: np.ndarray) -> np.ndarray:
        known, W, b, _ = self._fitted()
        scores = self.Z_test[rows] @ W.T + b                                  # (B, k)
        return known[scores.argmax(axis=1)]

    def _mahalanobis(self, Z: np.ndarray) -> np.ndarray:
        """Mahalanobis distances (B, k) to the known class means:
        (z - mu)^T P (z - mu) = z^T P z - 2 z^T W^T - 2 b."""
        _, W, b, P = self._fitted()
        zPz = ((Z @ P) * Z).sum(axis=1)                                       # (B,)
        return np.sqrt(np.maximum(zPz[:, None] - 2 * Z @ W.T - 2 * b, 0.0))  # (B, k)

    def novelty(self, rows: np.ndarray) -> tuple[np.ndarray, None]:
        return self._mahalanobis(self.Z_test[rows]).min(axis=1), None


class ClassBalancedReservoir:
    """Class-balanced reservoir sampling (CBRS, Chrysakis & Moens 2020) of row indices.

    Invariants: never more than ``capacity`` items; until full, everything is kept; when
    full, an item of a class that is not (one of) the largest replaces a random item of a
    largest class, and an item of a largest class replaces a random item of its own class
    with probability stored / seen for that class (a reservoir within the class).
    """

    def __init__(self, capacity: int, labels: np.ndarray, rng: np.random.Generator):
        self.capacity = capacity
        self.labels = labels
        self.rng = rng
        self.items: list[int] = []
        self.by_class: dict[int, list[int]] = {}      # class -> positions in items
        self.seen: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, row: int) -> None:
        c = int(self.labels[row])
        self.seen[c] = self.seen.get(c, 0) + 1
        mine = self.by_class.setdefault(c, [])
        if len(self.items) < self.capacity:
            mine.append(len(self.items))
            self.items.append(row)
            return
        largest = max(len(v) for v in self.by_class.values())
        if len(mine) < largest:
            victims = [k for k, v in self.by_class.items() if len(v) == largest]
            victim_class = victims[int(self.rng.integers(len(victims)))]
            pos = self.by_class[victim_class].pop(int(self.rng.integers(largest)))
            mine.append(pos)
            self.items[pos] = row
        elif self.rng.random() < len(mine) / self.seen[c]:
            self.items[mine[int(self.rng.integers(len(mine)))]] = row

    def sample(self, k: int) -> np.ndarray:
        k = min(k, len(self.items))
        idx = self.rng.choice(len(self.items), size=k, replace=False)
        return np.asarray(self.items, dtype=np.int64)[idx]


class HeadSGD(Method):
    """The bundle's head in torch (+ rows for new classes), SGD on the stream."""

    def __init__(self, data: StreamData, *, replay: bool):
        import torch
        from torch import nn

        from agent.bundle import load_bundle
        from agent.head import Head

        torch.set_num_threads(1)
        cfg = data.config
        bundle = load_bundle(data.bundle_path)
        head = Head.from_npz(bundle.file("head.npz"), bundle.manifest)
        classes = data.ds.classes
        K = len(classes)
        torch.manual_seed(cfg.seed)
        layers: list[nn.Module] = []
        for i, (W, b) in enumerate(zip(head.weights, head.biases, strict=True)):
            last = i == head.n_layers - 1
            lin = nn.Linear(W.shape[1], K if last else W.shape[0])
            with torch.no_grad():
                if last:            # the bundle's rows where its classes are; new rows random
                    for r, name in enumerate(bundle.classes):
                        lin.weight[classes.index(name)] = torch.from_numpy(W[r])
                        lin.bias[classes.index(name)] = float(b[r])
                else:
                    lin.weight.copy_(torch.from_numpy(W))
                    lin.bias.copy_(torch.from_numpy(b))
            layers.append(lin)
            if not last:
                layers.append(nn.ReLU())
        self.torch = torch
        self.net = nn.Sequential(*layers)
        self.seen = torch.zeros(K, dtype=torch.bool)
        self.seen[[classes.index(c) for c in bundle.classes]] = True
        self.Z = torch.from_numpy(np.ascontiguousarray(data.Z, dtype=np.float32))
        self.Z_test = torch.from_numpy(np.ascontiguousarray(data.Z_test, dtype=np.float32))
        self.y = torch.from_numpy(data.ds.y.astype(np.int64))
        self.replay = replay
        lr = REPLAY_LR if replay else FINETUNE_LR
        self.opt = torch.optim.SGD(self.net.parameters(), lr=lr)
        if replay:
            self.name = "replay"
            self.buffer = ClassBalancedReservoir(cfg.memory, data.ds.y,
                                                 np.random.default_rng(cfg.seed))
            for r in _base_rows(data):
                self.buffer.add(int(r))
            self.description = (f"frozen encoder + head, experience replay: SGD lr {lr:g} on "
                                f"the new window + {REPLAY_BATCH} replayed latents per step")
            self.stored = f"class-balanced reservoir of {cfg.memory} latents (base + stream)"
        else:
            self.name = "finetune"
            self.description = f"frozen encoder + head fine-tuned naively: SGD lr {lr:g}, batch 1"
            self.stored = "nothing (the head's weights only)"

    def _logits(self, Z):
        return self.net(Z).masked_fill(~self.seen, -1e9)                  # (B, K)

    def learn_one(self, row: int) -> None:
        torch = self.torch
        self.seen[int(self.y[row])] = True
        rows = [row]
        if self.replay and len(self.buffer):
            rows += self.buffer.sample(REPLAY_BATCH).tolist()
        idx = torch.tensor(rows)
        self.opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(self._logits(self.Z[idx]), self.y[idx])
        loss.backward()
        self.opt.step()
        if self.replay:
            self.buffer.add(row)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self._logits(self.Z_test[self.torch.from_numpy(rows)]).argmax(1).numpy()

    def info(self) -> dict:
        return {"memory_used": len(self.buffer)} if self.replay else {}


def joint_result(pred: np.ndarray, ds: Dataset, split: Split, description: str,
                 **extra) -> dict:
    """A joint reference's accuracy from its test predictions (class indices): ``acc`` =
    mean over tasks like ACC, ``acc_all`` over all test windows, ``per_task``."""
    correct = pred == ds.y_test
    task_test = split.task_of_class[ds.y_test]
    per_task = [float(correct[task_test == j].mean()) for j in range(split.n_tasks + 1)]
    return {"acc": round(float(np.mean(per_task)), 6),
            "acc_all": round(float(correct.mean()), 6),
            "per_task": [round(v, 6) for v in per_task], "description": description, **extra}


def base_recipe(manifest: dict, n_classes: int, cfg: CLConfig):
    """The base bundle's architecture (for ``n_classes``) and training config, from its
    manifest; a manifest without a training config gets `TrainConfig`'s defaults with
    the protocol's seed and epochs."""
    from dataclasses import fields

    from export.model import ArchConfig
    from export.train import TrainConfig

    arch = ArchConfig.from_dict({**manifest["arch"], "n_classes": n_classes})
    recorded = (manifest.get("training") or {}).get("config")
    if recorded:
        known = {f.name for f in fields(TrainConfig)}
        tc = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in recorded.items() if k in known})
    else:
        tc = TrainConfig(seed=cfg.seed, **({} if cfg.epochs is None else {"epochs": cfg.epochs}))
    return arch, tc


def joint_upper_bound(ds: Dataset, split: Split, cfg: CLConfig, base_manifest: dict) -> dict:
    """The base bundle's recipe (its architecture and training config, `base_recipe`)
    trained offline on every class with `export.train`; accuracy on the whole test split,
    also grouped by task like the methods' final row."""
    import torch

    from export.train import deterministic_torch, train

    arch, tc = base_recipe(base_manifest, len(ds.classes), cfg)
    t0 = time.perf_counter()
    model, m = train(ds, tc, arch, verbose=False)
    with deterministic_torch(tc.threads), torch.no_grad():
        X_test = torch.from_numpy(ds.X_test)
        pred = np.concatenate([model(X_test[s:s + 256]).argmax(1).numpy()
                               for s in range(0, len(X_test), 256)])
    return joint_result(pred, ds, split,
                        "the base bundle's architecture and training config (its manifest) "
                        "trained offline on all classes (export.train); acc = mean over tasks "
                        "like ACC, acc_all = over all test windows",
                        arch=arch.arch, epochs_run=m.get("epochs_run"),
                        train_s=round(time.perf_counter() - t0, 2))
