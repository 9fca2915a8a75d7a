"""The adapter update written in torch: the oracle of the numba kernels and their baseline.

Tests check `agent.sleep.kernels` against `loss_and_grad` (autograd) and `TorchTrainer`
(torch's Adam + clip_grad_norm_). `reverie bench sleep` (export/bench_sleep.py) times
consolidating 10k replayed samples both ways on one core with `compare` (issue 5's target:
numba <= 5 s and >= 2x faster than torch). Lives in `export` because `agent` never
imports torch.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from agent.head import Head
from agent.sleep import kernels
from agent.sleep.adapters import AdaptedHead


class TorchAdapted(torch.nn.Module):
    """`AdaptedHead` as a torch module: frozen W_i, b_i; trainable A_i, B_i, N, c."""

    def __init__(self, ad: AdaptedHead, dtype=torch.float32):
        super().__init__()
        t = lambda a: torch.tensor(np.asarray(a), dtype=dtype)  # noqa: E731
        self.W = [t(W) for W in ad.base.weights]
        self.b = [t(b) for b in ad.base.biases]
        self.A = torch.nn.ParameterList(torch.nn.Parameter(t(a)) for a in ad.A)
        self.B = torch.nn.ParameterList(torch.nn.Parameter(t(b)) for b in ad.B)
        self.N = torch.nn.Parameter(t(ad.N))
        self.S = torch.nn.Parameter(t(ad.S))
        self.c = torch.nn.Parameter(t(ad.c))
        self.relu = ad.base.activation == "relu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x                                                           # (B, d)
        last = len(self.W) - 1
        for i, (W, b, A, B) in enumerate(zip(self.W, self.b, self.A, self.B, strict=True)):
            z = h @ W.T + b + (h @ A.T) @ B.T                           # (B, out_i)
            if i < last:
                h = torch.relu(z) if self.relu else z
            else:
                return torch.cat([z, h @ self.N.T + x @ self.S.T + self.c], dim=1)  # (B, K)
        raise AssertionError("unreachable")

    def flat(self) -> np.ndarray:
        """Parameters in `AdaptedHead.pack` order (A_i, B_i per layer, then N, S, c)."""
        parts = [p for a, b in zip(self.A, self.B, strict=True) for p in (a, b)]
        return torch.cat([p.detach().reshape(-1) for p in parts + [self.N, self.S, self.c]]).numpy()

    def flat_grad(self) -> np.ndarray:
        parts = [p for a, b in zip(self.A, self.B, strict=True) for p in (a, b)]
        return torch.cat([p.grad.reshape(-1) for p in parts + [self.N, self.S, self.c]]).numpy()


def loss_fn(logits, y, t_logits, kd_weight: float, temperature: float) -> torch.Tensor:
    """CE to the labels + kd_weight * T^2 * KL(teacher || student) on the teacher's classes."""
    loss = torch.nn.functional.cross_entropy(logits, y)
    kp = t_logits.shape[1]
    if kp and kd_weight:
        log_p = torch.log_softmax(logits[:, :kp] / temperature, dim=1)
        log_q = torch.log_softmax(t_logits / temperature, dim=1)
        kl = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
        loss = loss + kd_weight * temperature ** 2 * kl
    return loss


def loss_and_grad(ad: AdaptedHead, x, y, t_logits, kd_weight=1.0, temperature=2.0,
                  dtype=torch.float64) -> tuple[float, np.ndarray]:
    """Autograd's loss and d loss / d theta (in `pack` order) at `ad`'s parameters."""
    model = TorchAdapted(ad, dtype)
    loss = loss_fn(model(torch.tensor(x, dtype=dtype)), torch.tensor(y, dtype=torch.int64),
                   torch.tensor(t_logits, dtype=dtype), kd_weight, temperature)
    loss.backward()
    return float(loss.detach()), model.flat_grad()


class TorchTrainer:
    """The whole update in torch: forward, loss, backward, clip_grad_norm_, Adam."""

    def __init__(self, ad: AdaptedHead, lr=3e-3, betas=(0.9, 0.999), eps=1e-8, max_norm=1.0,
                 kd_weight=1.0, temperature=2.0):
        self.model = TorchAdapted(ad)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr, betas=betas, eps=eps)
        self.max_norm, self.kd_weight, self.temperature = max_norm, kd_weight, temperature

    def step(self, x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(x), y, t_logits, self.kd_weight, self.temperature)
        loss.backward()
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.opt.step()
        return loss.item()


def random_head(dims=(64, 128, 64, 4), seed=0, activation="relu") -> Head:
    rng = np.random.default_rng(seed)
    Ws = [(rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)
          for i, o in zip(dims[:-1], dims[1:], strict=True)]
    bs = [(0.1 * rng.standard_normal(o)).astype(np.float32) for o in dims[1:]]
    return Head(Ws, bs, activation)


def random_adapted(dims=(64, 128, 64, 4), rank=4, n_new=2, seed=0,
                   activation="relu") -> AdaptedHead:
    """A head with non-zero adapters and new rows (gradients flow through every part)."""
    rng = np.random.default_rng(seed + 1)
    ad = AdaptedHead.fresh(random_head(dims, seed, activation), rank, seed)
    ad = ad.with_classes(ad.n_classes + n_new)
    p = ad.pack()
    return ad.unpack((0.1 * rng.standard_normal(p.theta.shape)).astype(np.float32), version=1)


def numba_train(ad: AdaptedHead, X, Y, T, batch_size=32, lr=3e-3, max_norm=1.0,
                kd_weight=1.0, temperature=2.0) -> tuple[np.ndarray, float]:
    """The numba loop over pre-drawn samples (what consolidate runs): (theta, seconds)."""
    p = ad.pack()
    theta = p.theta.copy()
    grad, m, v = (np.zeros_like(theta) for _ in range(3))
    t0 = time.perf_counter()
    for step, s in enumerate(range(0, len(X), batch_size), start=1):
        kernels.train_step(X[s: s + batch_size], Y[s: s + batch_size], T[s: s + batch_size],
                           p.layout, p.rank, p.n_new, p.nw_off, p.act, p.wflat, p.bflat, theta,
                           kd_weight, temperature, grad, m, v, step, lr, 0.9, 0.999, 1e-8,
                           max_norm)
    return theta, time.perf_counter() - t0


def torch_train(ad: AdaptedHead, X, Y, T, batch_size=32, **kw) -> tuple[np.ndarray, float]:
    torch.set_num_threads(1)
    tr = TorchTrainer(ad, **kw)
    Xt, Yt, Tt = torch.from_numpy(X), torch.from_numpy(Y), torch.from_numpy(T)
    t0 = time.perf_counter()
    for s in range(0, len(X), batch_size):
        tr.step(Xt[s: s + batch_size], Yt[s: s + batch_size], Tt[s: s + batch_size])
    return tr.model.flat(), time.perf_counter() - t0


def compare(n_samples=10_000, dims=(64, 128, 64, 4), rank=4, n_new=2, batch_size=32,
            seed=0, repeats=3) -> dict:
    """Time the same adapter update in numba and torch (one core); best of `repeats`."""
    ad = random_adapted(dims, rank, n_new, seed)
    rng = np.random.default_rng(seed)
    X = np.abs(rng.standard_normal((n_samples, dims[0]))).astype(np.float32)
    Y = rng.integers(0, ad.n_classes, n_samples).astype(np.int64)
    T = ad.logits(X)[:, : ad.n_classes - n_new].astype(np.float32)
    numba_train(ad, X[:64], Y[:64], T[:64], batch_size)                   # compile / load cache
    nb = min(numba_train(ad, X, Y, T, batch_size)[1] for _ in range(repeats))
    th = min(torch_train(ad, X, Y, T, batch_size)[1] for _ in range(repeats))
    # Same trajectory: compared over 50 steps. Longer runs drift apart from rounding alone
    # (Adam divides tiny gradients by tiny second moments), ~1e-4 after 100 steps here.
    k = 50 * batch_size
    theta_nb, _ = numba_train(ad, X[:k], Y[:k], T[:k], batch_size)
    theta_th, _ = torch_train(ad, X[:k], Y[:k], T[:k], batch_size)
    return {"n_samples": n_samples, "dims": list(dims), "rank": rank, "batch_size": batch_size,
            "numba_s": round(nb, 4), "torch_s": round(th, 4), "speedup": round(th / nb, 2),
            "max_param_diff_50_steps": float(np.abs(theta_nb - theta_th).max())}


if __name__ == "__main__":
    for dims in ((64, 128, 64, 4), (128, 64, 5), (256, 64, 10)):
        for bs in (32, 64):
            print(json.dumps(compare(dims=dims, batch_size=bs)))
