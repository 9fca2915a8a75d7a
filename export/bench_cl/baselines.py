"""Baselines on the base bundle's frozen latents, and the joint upper bound.

* ``ncm``: nearest class mean (Euclidean) on the latents; the means start from every
  base training latent and are updated by each stream window. Stores K means, no
  exemplars.
* ``slda``: streaming LDA (Hayes & Kanan 2020): running class means and one shared
  covariance, updated per window; predicts with ``((1 - e) S + e I)^-1``, shrinkage
  e = 1e-4. Initialised by streaming the base training latents through the same update.
  Stores K means and a d x d covariance, no exemplars.
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


def build(name: str, data: StreamData) -> Method:
    if name == "ncm":
        return NearestClassMean(data)
    if name == "slda":
        return StreamingLDA(data)
    if name == "finetune":
        return HeadSGD(data, replay=False)
    if name == "replay":
        return HeadSGD(data, replay=True)
    raise ValueError(f"unknown baseline {name!r}")


def _base_rows(data: StreamData) -> np.ndarray:
    """The base classes' training rows, in a seeded order."""
    rows = np.flatnonzero(np.isin(data.ds.y, data.split.tasks[0]))
    return np.random.default_rng(data.config.seed).permutation(rows)


class NearestClassMean(Method):
    name = "ncm"
    description = "frozen latent + nearest class mean (Euclidean)"
    stored = "one running mean per class (no exemplars)"

    def __init__(self, data: StreamData):
        self.Z, self.Z_test, self.y = data.Z.astype(np.float64), data.Z_test, data.ds.y
        K, d = len(data.ds.classes), self.Z.shape[1]
        self.sums = np.zeros((K, d))            # (K, d)
        self.counts = np.zeros(K)
        base = _base_rows(data)
        np.add.at(self.sums, self.y[base], self.Z[base])
        np.add.at(self.counts, self.y[base], 1)

    def learn_one(self, row: int) -> None:
        c = self.y[row]
        self.sums[c] += self.Z[row]
        self.counts[c] += 1

    def predict(self, rows: np.ndarray) -> np.ndarray:
        known = np.flatnonzero(self.counts > 0)
        means = self.sums[known] / self.counts[known, None]                 # (k, d)
        Z = self.Z_test[rows].astype(np.float64)                            # (B, d)
        d2 = (means ** 2).sum(1)[None] - 2 * Z @ means.T                     # (B, k) + |z|^2
        return known[d2.argmin(axis=1)]


class StreamingLDA(Method):
    name = "slda"
    description = (f"frozen latent + streaming LDA (Hayes & Kanan 2020), shrinkage "
                   f"{SLDA_SHRINKAGE:g}")
    stored = "running class means and one shared covariance (no exemplars)"

    def __init__(self, data: StreamData):
        self.Z, self.Z_test, self.y = data.Z.astype(np.float64), data.Z_test, data.ds.y
        K, d = len(data.ds.classes), self.Z.shape[1]
        self.mu = np.zeros((K, d))               # (K, d)
        self.counts = np.zeros(K)
        self.S = np.zeros((d, d))                # shared covariance
        self.n = 0
        self._W: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        for r in _base_rows(data):
            self.learn_one(int(r))

    def learn_one(self, row: int) -> None:
        z, c = self.Z[row], self.y[row]
        dz = z - self.mu[c]                       # against the class mean before this sample
        self.S = (self.n * self.S + np.outer(dz, dz) * self.n / (self.n + 1)) / (self.n + 1)
        self.mu[c] += dz / (self.counts[c] + 1)
        self.counts[c] += 1
        self.n += 1
        self._W = None

    def predict(self, rows: np.ndarray) -> np.ndarray:
        if self._W is None:
            known = np.flatnonzero(self.counts > 0)
            d = self.S.shape[0]
            P = np.linalg.inv((1 - SLDA_SHRINKAGE) * self.S + SLDA_SHRINKAGE * np.eye(d))
            W = self.mu[known] @ P                                            # (k, d)
            b = -0.5 * (W * self.mu[known]).sum(axis=1)                       # (k,)
            self._W = (known, W, b)
        known, W, b = self._W
        scores = self.Z_test[rows].astype(np.float64) @ W.T + b              # (B, k)
        return known[scores.argmax(axis=1)]


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


def joint_upper_bound(ds: Dataset, split: Split, cfg: CLConfig) -> dict:
    """The same torch model (`export.train`, the base bundle's architecture and training
    config) trained offline on every class; accuracy on the whole test split, also
    grouped by task like the methods' final row."""
    import torch

    from export.train import TrainConfig, deterministic_torch, train

    tc = TrainConfig(seed=cfg.seed) if cfg.epochs is None else TrainConfig(seed=cfg.seed,
                                                                           epochs=cfg.epochs)
    t0 = time.perf_counter()
    model, m = train(ds, tc, verbose=False)
    with deterministic_torch(tc.threads), torch.no_grad():
        pred = model(torch.from_numpy(ds.X_test)).argmax(1).numpy()
    correct = pred == ds.y_test
    task_test = split.task_of_class[ds.y_test]
    per_task = [float(correct[task_test == j].mean()) for j in range(split.n_tasks + 1)]
    return {"acc": round(float(np.mean(per_task)), 6),
            "acc_all": round(float(correct.mean()), 6),
            "per_task": [round(v, 6) for v in per_task],
            "description": "the base bundle's architecture trained offline on all classes "
                           "(export.train, same seed and config); acc = mean over tasks like "
                           "ACC, acc_all = over all test windows",
            "epochs_run": m.get("epochs_run"), "train_s": round(time.perf_counter() - t0, 2)}
