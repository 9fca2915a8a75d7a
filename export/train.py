"""Seeded, deterministic training: Adam, a stratified validation split, early stopping.

    model, metrics = train(load_dataset("digits.npz"), TrainConfig(epochs=30))

The same dataset, config and seed give bit-identical weights on the same machine
(fixed thread count, deterministic algorithms, one seeded generator for shuffling and
augmentation). A frozen-feature arch (minirocket) fits its transform on the training
windows first (seeded by ``seed``) and trains only its dense layers, on cached features.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from agent.dataset import Dataset, stratified_split
from agent.errors import ConfigError, DatasetError
from export.model import (
    FROZEN_FEATURE_ARCHS,
    ArchConfig,
    ReverieNet,
    build_model,
    normalization_stats,
)

MIN_TRAIN_PER_CLASS = 2


@dataclass(frozen=True)
class TrainConfig:
    """Training knobs (the architecture lives in `ArchConfig`)."""

    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 8
    min_delta: float = 1e-4  # a val-loss drop smaller than this is not an improvement
    seed: int = 0
    val_fraction: float = 0.15
    # Label smoothing keeps the latent from collapsing onto the base classes: measured on
    # digits (base 0-4), 5-shot new-class recall on the device 0.59 -> 0.69 (issue 4).
    label_smoothing: float = 0.1
    # Augmentation of (C, T) windows, seeded (`augment_windows`): per-channel amplitude
    # scaling, jitter and a random time shift. A trained encoder (cnn1d) sees fresh
    # augmented batches every epoch; a frozen one (minirocket) gets ``augment_copies``
    # augmented copies of every training window, transformed once.
    augment: bool = False
    scale_sigma: float = 0.1     # per-channel amplitude factor ~ N(1, scale_sigma)
    jitter_sigma: float = 0.03   # Gaussian noise, in units of the channel's std
    shift_fraction: float = 0.1  # time shift up to this fraction of the window (edge-padded)
    augment_copies: int = 4
    # One thread: these models are too small to gain from two, and on a busy 2-core
    # device a second OpenMP thread that has to wait for a core slows training ~10x.
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}, expected >= 1")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed}, expected >= 0")
        if self.patience < 0:
            raise ConfigError(f"patience={self.patience}, expected >= 0")
        if not self.min_delta >= 0:
            raise ConfigError(f"min_delta={self.min_delta}, expected >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr={self.lr}, expected a positive number")
        if not 0 <= self.weight_decay < 1:
            raise ConfigError(f"weight_decay={self.weight_decay}, expected 0 <= wd < 1")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing={self.label_smoothing}, expected 0 <= ls < 1")
        for name in ("scale_sigma", "jitter_sigma"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}, expected 0 <= value < 1")
        if not 0 <= self.shift_fraction < 0.5:
            raise ConfigError(f"shift_fraction={self.shift_fraction}, expected 0 <= f < 0.5")
        if self.augment_copies < 0:
            raise ConfigError(f"augment_copies={self.augment_copies}, expected >= 0")
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction={self.val_fraction}, expected 0 < f < 0.5")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_trainable(ds: Dataset) -> None:
    """Refuse datasets a classifier cannot be trained and validated on (DatasetError)."""
    if len(ds.classes) < 2:
        raise DatasetError(f"dataset has {len(ds.classes)} class ({list(ds.classes)}); "
                           "training needs >= 2 classes")
    counts = np.bincount(ds.y, minlength=len(ds.classes))
    few = [(ds.classes[i], int(n)) for i, n in enumerate(counts) if n < MIN_TRAIN_PER_CLASS]
    if few:
        shown = ", ".join(f"{c!r}: {n}" for c, n in few[:5])
        raise DatasetError(f"too few training samples per class ({shown}); need >= "
                           f"{MIN_TRAIN_PER_CLASS} per class after the test split")


@contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """Fix threads and deterministic kernels for the block, then restore the old settings."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def augment_windows(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, cfg: TrainConfig,
                    gen: torch.Generator) -> torch.Tensor:
    """Augmented raw windows (B, C, T): around the channel ``mean`` (C, 1), scale each
    window's channels by N(1, scale_sigma), add N(0, (jitter_sigma * std)^2) noise, and
    shift in time by up to ``shift_fraction * T`` samples (edges repeated, not wrapped).

    >>> x = torch.zeros(2, 3, 50)
    >>> augment_windows(x, torch.zeros(3, 1), torch.ones(3, 1), TrainConfig(),
    ...                 torch.Generator().manual_seed(0)).shape
    torch.Size([2, 3, 50])
    """
    B, C, T = x.shape
    scale = 1 + cfg.scale_sigma * torch.randn(B, C, 1, generator=gen)       # (B, C, 1)
    noise = cfg.jitter_sigma * std * torch.randn(B, C, T, generator=gen)    # (B, C, T)
    out = mean + (x - mean) * scale + noise
    max_shift = int(cfg.shift_fraction * T)
    if max_shift > 0:
        shift = torch.randint(-max_shift, max_shift + 1, (B, 1, 1), generator=gen)
        idx = (torch.arange(T).view(1, 1, T) - shift).clamp(0, T - 1).expand(B, C, T)
        out = torch.gather(out, 2, idx)
    return out


class _DenseOnly(nn.Module):
    """The dense layers of a frozen-feature model, on cached features (training)."""

    def __init__(self, net: ReverieNet):
        super().__init__()
        self.net = net

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net.dense_layers(h)  # (B, feature_dim) -> (B, K)


@torch.no_grad()
def _frozen_features(model: ReverieNet, X: torch.Tensor, batch: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(model.normalize(X[s:s + batch]))
                      for s in range(0, len(X), batch)])                   # (N, feature_dim)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 512
             ) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (put in eval mode) on ``(X, y)``."""
    model.eval()
    if len(X) == 0:
        return float("nan"), float("nan")
    loss_sum, correct = 0.0, 0
    for start in range(0, len(X), batch_size):
        logits = model(X[start:start + batch_size])  # (B, K)
        yb = y[start:start + batch_size]
        loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(dim=1) == yb).sum())
    return loss_sum / len(X), correct / len(X)


def _progress(out: TextIO | None, epoch: int, cfg: TrainConfig, loss: float, val_loss: float,
              val_acc: float, best: bool, elapsed_s: float) -> None:
    if out is None:
        return
    width = 20
    done = round(width * epoch / cfg.epochs)
    bar = "#" * done + "." * (width - done)
    mark = " *" if best else ""
    print(f"epoch {epoch:>{len(str(cfg.epochs))}}/{cfg.epochs} [{bar}] loss {loss:.4f} "
          f"val_loss {val_loss:.4f} val_acc {val_acc:.3f} {elapsed_s:5.1f}s{mark}",
          file=out, flush=True)


def train(ds: Dataset, cfg: TrainConfig = TrainConfig(), arch: ArchConfig | None = None,
          *, verbose: bool = True) -> tuple[ReverieNet, dict[str, Any]]:
    """Train on ``ds.X`` (minus a validation split), report accuracy on ``ds.X_test``.

    Returns the model with the weights of the best validation-loss epoch, in eval mode,
    and a metrics dict. ``arch`` defaults to `ArchConfig.for_data` on the data's shape.
    With ``verbose``, one progress line per epoch goes to stderr.
    """
    check_trainable(ds)
    if arch is None:
        arch = ArchConfig.for_data(ds.input_shape, len(ds.classes))
    if arch.input_shape != ds.input_shape or arch.n_classes != len(ds.classes):
        raise ConfigError(f"arch is for input {arch.input_shape} with {arch.n_classes} classes; "
                          f"data has {ds.input_shape} with {len(ds.classes)}")
    log = sys.stderr if verbose else None
    t0 = time.perf_counter()
    tr, va = stratified_split(ds.y, cfg.val_fraction, cfg.seed)
    mean, std = normalization_stats(ds.X[tr])

    with deterministic_torch(cfg.threads):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        model = build_model(arch, mean, std)
        X_tr, y_tr = torch.from_numpy(ds.X[tr]), torch.from_numpy(ds.y[tr])
        X_va, y_va = torch.from_numpy(ds.X[va]), torch.from_numpy(ds.y[va])
        frozen = arch.arch in FROZEN_FEATURE_ARCHS
        if frozen:
            # Fit the transform on the training windows, then train the dense layers on
            # its cached output (the features never change).
            with torch.no_grad():
                model.features.fit(model.normalize(X_tr), cfg.seed)
            fwd: nn.Module = _DenseOnly(model)
            inputs_tr, y_fit = _frozen_features(model, X_tr), y_tr
            if cfg.augment and cfg.augment_copies and X_tr.ndim == 3:
                mean_t, std_t = model.normalize.mean, model.normalize.std
                copies = [_frozen_features(model, augment_windows(X_tr, mean_t, std_t, cfg, gen))
                          for _ in range(cfg.augment_copies)]
                inputs_tr = torch.cat([inputs_tr, *copies])
                y_fit = y_tr.repeat(cfg.augment_copies + 1)
            inputs_va = _frozen_features(model, X_va)
        else:
            fwd, inputs_tr, y_fit, inputs_va = model, X_tr, y_tr, X_va
        augment_online = cfg.augment and not frozen and X_tr.ndim == 3
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

        best_loss, best_epoch, best_state = math.inf, 0, None
        epoch = 0
        for epoch in range(1, cfg.epochs + 1):
            fwd.train()
            loss_sum = 0.0
            for idx in _batches(len(inputs_tr), cfg.batch_size, gen):
                xb = inputs_tr[idx]
                if augment_online:
                    xb = augment_windows(xb, model.normalize.mean, model.normalize.std, cfg, gen)
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(fwd(xb), y_fit[idx],
                                                   label_smoothing=cfg.label_smoothing)
                loss.backward()
                opt.step()
                loss_sum += loss.item() * len(idx)
            if not math.isfinite(loss_sum):
                raise ConfigError(f"training diverged (loss {loss_sum} in epoch {epoch}); "
                                  f"try a lower lr than {cfg.lr}")
            val_loss, val_acc = evaluate(fwd, inputs_va, y_va)
            improved = val_loss < best_loss - cfg.min_delta
            if improved:
                best_loss, best_epoch = val_loss, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            _progress(log, epoch, cfg, loss_sum / len(inputs_tr), val_loss, val_acc, improved,
                      time.perf_counter() - t0)
            if epoch - best_epoch > cfg.patience:
                break
        if best_state is not None:
            model.load_state_dict(best_state)

        _, train_acc = evaluate(model, X_tr, y_tr)
        val_loss, val_acc = evaluate(model, X_va, y_va)
        _, test_acc = evaluate(model, torch.from_numpy(ds.X_test), torch.from_numpy(ds.y_test))
    model.eval()
    metrics = {
        "train_accuracy": round(train_acc, 6),
        "val_accuracy": round(val_acc, 6),
        "test_accuracy": round(test_acc, 6) if not math.isnan(test_acc) else None,
        "val_loss": round(val_loss, 6),
        "epochs_run": epoch,
        "best_epoch": best_epoch,
        "n_train": len(tr),
        "n_val": len(va),
        "n_test": len(ds.X_test),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return model, metrics
