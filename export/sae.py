"""A top-k sparse autoencoder on the encoder's latents, for the device's sparse coder.

    arrays, report = train_sae(Z_train, Z_test, SAEConfig(n_units=1024))

The model (Makhzani & Frey 2013; Gao et al. 2024) in the latent space of the bundle::

    code  z     = top_k(relu(W_enc @ x + b_enc))   (m,)  k of m units nonzero
    recon x_hat = W_dec @ z + b_dec                (d,)

Training runs in a normalized space (latents centred on their training mean and divided
by one global scale, so the geometry is unchanged), with unit-norm decoder columns and
the encoder initialised as the decoder's transpose. (An AuxK loss for dead units was
tried: on digits it cut dead units from 27% to 15% for 50% more time, on the simulated
data it did nothing; left out.) The exported arrays have the normalization folded in,
so the formulas above hold on raw latents, exactly as
`agent.memory.sparse.SparseCoder.from_sae` applies them.

``sae.npz`` (``np.load(..., allow_pickle=False)``): ``W_enc`` float32 (m, d), ``b_enc``
(m,), ``W_dec`` float32 (d, m), ``b_dec`` (d,), ``k`` int64 scalar. The report (in the
manifest's ``sae``) gives the reconstruction error as relative MSE,
``sum |x - x_hat|^2 / sum |x - mean_train|^2`` (fraction of variance unexplained), and
the fraction of units active, both measured on test latents with the exported arrays;
``relative_mse_held_out`` is the error on latents of classes held out of training (the
ones the device will learn), when given.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from agent.errors import ConfigError, DatasetError
from export.train import deterministic_torch

SAE_FILE = "sae.npz"


@dataclass(frozen=True)
class SAEConfig:
    n_units: int = 1024
    active_fraction: float = 0.02
    # 1500 steps of 64: ~9 s on a busy core for d=128, m=1024 (digits: 3.1% relative
    # MSE on test latents; batches of 256 reached 3.3% in 23 s).
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("n_units", "steps", "batch_size", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"sae {name}={v!r}, expected an int >= 1")
        if not 0.0 < self.active_fraction <= 1.0:
            raise ConfigError(f"sae active_fraction={self.active_fraction!r}, expected "
                              "0 < fraction <= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"sae lr={self.lr!r}, expected a positive number")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"sae seed={self.seed!r}, expected an int >= 0")

    @property
    def k(self) -> int:
        """Active units per code: ``round(n_units * active_fraction)``, at least 1."""
        return max(1, min(self.n_units, round(self.n_units * self.active_fraction)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"k": self.k}


def sae_codes(arrays: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """Dense codes ``(N, m)`` of latents ``X (N, d)`` with the exported arrays (numpy)."""
    pre = X.astype(np.float32) @ arrays["W_enc"].T + arrays["b_enc"]      # (N, m)
    pre = np.maximum(pre, 0.0)
    k = int(arrays["k"])
    top = np.argpartition(-pre, k - 1, axis=1)[:, :k]                     # (N, k)
    z = np.zeros_like(pre)
    np.put_along_axis(z, top, np.take_along_axis(pre, top, axis=1), axis=1)
    return z


def sae_reconstruct(arrays: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    return sae_codes(arrays, X) @ arrays["W_dec"].T + arrays["b_dec"]     # (N, d)


def _decode(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    # Only the k active atoms: B*k*d multiply-adds instead of B*m*d.
    atoms = W_dec.T[idx]                                     # (B, k, d)
    return (vals.unsqueeze(-1) * atoms).sum(dim=1)           # (B, d)


def train_sae(Z_train: np.ndarray, Z_test: np.ndarray, cfg: SAEConfig = SAEConfig(),
              Z_held_out: np.ndarray | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train on latents ``Z_train (N, d)``; return the exported arrays and a report.

    ``Z_test`` (and ``Z_held_out``, latents of classes not trained on) only measure.
    """
    Z_train = np.asarray(Z_train, np.float32)
    Z_test = np.asarray(Z_test, np.float32)
    if Z_train.ndim != 2 or len(Z_train) < 2:
        raise DatasetError(f"sae: training latents have shape {Z_train.shape}, expected (N >= 2, d)")
    if Z_test.ndim != 2 or Z_test.shape[1] != Z_train.shape[1]:
        raise DatasetError(f"sae: test latents have shape {Z_test.shape}, expected "
                           f"(N, {Z_train.shape[1]})")
    if cfg.k > cfg.n_units:
        raise ConfigError(f"sae k={cfg.k} exceeds n_units={cfg.n_units}")
    t0 = time.perf_counter()
    d, m, k = Z_train.shape[1], cfg.n_units, cfg.k
    mu = Z_train.astype(np.float64).mean(axis=0)
    scale = float(np.sqrt(((Z_train - mu) ** 2).sum(axis=1).mean() / d)) or 1.0
    with deterministic_torch(cfg.threads):
        gen = torch.Generator().manual_seed(cfg.seed)
        X = torch.from_numpy(((Z_train - mu) / scale).astype(np.float32))        # (N, d)
        W_dec = torch.randn(d, m, generator=gen)
        W_dec /= W_dec.norm(dim=0, keepdim=True)
        W_dec.requires_grad_(True)                                            # (d, m)
        W_enc = W_dec.detach().T.clone().requires_grad_(True)                 # (m, d)
        b_enc = torch.zeros(m, requires_grad=True)
        b_dec = torch.zeros(d, requires_grad=True)
        opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=cfg.lr)
        batch = min(cfg.batch_size, len(X))
        for _ in range(cfg.steps):
            xb = X[torch.randint(len(X), (batch,), generator=gen)]      # (B, d)
            pre = torch.relu(xb @ W_enc.T + b_enc)                       # (B, m)
            vals, idx = pre.topk(k, dim=1)                               # (B, k)
            loss = ((_decode(vals, idx, W_dec) + b_dec - xb) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():   # unit-norm dictionary atoms: the scale lives in z
                W_dec /= W_dec.norm(dim=0, keepdim=True).clamp_min(1e-8)
        if not math.isfinite(loss.item()):
            raise ConfigError(f"sae training diverged (loss {loss.item()}); try a lower lr "
                              f"than {cfg.lr}")
        We, be = W_enc.detach().double().numpy(), b_enc.detach().double().numpy()
        Wd, bd = W_dec.detach().double().numpy(), b_dec.detach().double().numpy()
    # Fold the normalization in: W_enc (x - mu)/s + b_enc and s (W_dec z + b_dec) + mu.
    arrays = {
        "W_enc": (We / scale).astype(np.float32),
        "b_enc": (be - We @ mu / scale).astype(np.float32),
        "W_dec": (Wd * scale).astype(np.float32),
        "b_dec": (bd * scale + mu).astype(np.float32),
        "k": np.array(k, dtype=np.int64),
    }
    report = {"config": cfg.to_dict(), "latent_dim": d,
              **sae_metrics(arrays, Z_train, Z_test, mu)}
    if Z_held_out is not None and len(Z_held_out):
        report["relative_mse_held_out"] = _relative_mse(
            arrays, np.asarray(Z_held_out, np.float32), mu)
        report["n_held_out"] = len(Z_held_out)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return arrays, report


def _relative_mse(arrays: dict[str, np.ndarray], Z: np.ndarray, mu: np.ndarray) -> float | None:
    if len(Z) == 0:
        return None
    err = ((sae_reconstruct(arrays, Z) - Z) ** 2).sum()
    var = ((Z - mu) ** 2).sum()
    return round(float(err / var), 6) if var > 0 else None


def sae_metrics(arrays: dict[str, np.ndarray], Z_train: np.ndarray, Z_test: np.ndarray,
                mu: np.ndarray) -> dict[str, Any]:
    """Reconstruction error and activity, measured with the exported arrays."""
    m = arrays["W_enc"].shape[0]
    Z_eval = Z_test if len(Z_test) else Z_train
    active = (sae_codes(arrays, Z_eval) > 0)                          # (N, m)
    ever = (sae_codes(arrays, Z_train) > 0).any(axis=0)               # (m,)
    return {
        "relative_mse_train": _relative_mse(arrays, Z_train, mu),
        "relative_mse_test": _relative_mse(arrays, Z_test, mu),
        "active_fraction": round(float(active.sum(axis=1).mean() / m), 6),
        "dead_fraction": round(float(1.0 - ever.mean()), 6),
        "n_train": len(Z_train), "n_test": len(Z_test),
    }


def check_sae_arrays(arrays: dict[str, np.ndarray], latent_dim: int) -> str | None:
    """None if ``arrays`` are a well-formed sae.npz for ``latent_dim``; else the problem."""
    missing = sorted({"W_enc", "b_enc", "W_dec", "b_dec", "k"} - set(arrays))
    if missing:
        return f"lacks {missing}"
    W_enc = arrays["W_enc"]
    if W_enc.ndim != 2 or W_enc.shape[1] != latent_dim:
        return f"W_enc has shape {W_enc.shape}, expected (n_units, {latent_dim})"
    m = W_enc.shape[0]
    want = {"W_enc": (m, latent_dim), "b_enc": (m,), "W_dec": (latent_dim, m),
            "b_dec": (latent_dim,)}
    for name, shape in want.items():
        a = arrays[name]
        if a.dtype != np.float32 or a.shape != shape:
            return f"{name} is {a.dtype}{list(a.shape)}, expected float32{list(shape)}"
        if not np.isfinite(a).all():
            return f"{name} holds NaN/Inf"
    k = arrays["k"]
    if k.shape != () or k.dtype.kind not in "iu" or not 1 <= int(k) <= m:
        return f"k={k!r}, expected an integer scalar in [1, {m}]"
    return None
