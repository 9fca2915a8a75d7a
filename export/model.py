"""The model architecture: one frozen dataclass, and the torch module it builds.

The module is ``Normalize -> encoder -> latent -> head``::

    raw window (B, C, T) or features (B, F)
      -> normalize   (x - mean) / std, per channel or per feature; buffers, so the
                     exported graph takes raw windows and the device does no scaling
      -> encoder     (B, latent_dim)   frozen on the device (a later bundle ships it alone)
      -> head        (B, n_classes)    small; the device adapts it

``ArchConfig`` is stored in the bundle's manifest (``arch``), so a bundle alone rebuilds
the module: ``build_model(ArchConfig.from_dict(m["arch"]), mean, std)`` plus its weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from agent.errors import ConfigError

ARCHS = ("mlp", "cnn1d")


@dataclass(frozen=True)
class ArchConfig:
    """Architecture hyper-parameters; validated at construction.

    ``mlp`` takes ``(F,)`` features (or flattens ``(C, T)`` windows); ``cnn1d`` takes
    ``(C, T)`` windows. ``hidden`` are the mlp's layer widths; ``channels`` and
    ``kernel_sizes`` the cnn1d's conv blocks (the first block keeps the time resolution,
    later ones halve it).
    """

    arch: str
    input_shape: tuple[int, ...]
    n_classes: int
    latent_dim: int = 64
    hidden: tuple[int, ...] = (128,)
    channels: tuple[int, ...] = (32, 64, 64)
    kernel_sizes: tuple[int, ...] = (7, 5, 3)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"arch={self.arch!r}, expected one of {list(ARCHS)}")
        shape = self.input_shape
        if len(shape) not in (1, 2) or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ConfigError(f"input_shape={shape!r}, expected (C, T) or (F,) of positive ints")
        if self.arch == "cnn1d" and len(shape) != 2:
            raise ConfigError(
                f"arch 'cnn1d' needs (C, T) windows, got input_shape={shape!r}; use arch 'mlp'")
        if self.n_classes < 2:
            raise ConfigError(f"n_classes={self.n_classes}, expected >= 2")
        if self.latent_dim < 1:
            raise ConfigError(f"latent_dim={self.latent_dim}, expected >= 1")
        if not all(h >= 1 for h in self.hidden):
            raise ConfigError(f"hidden={self.hidden!r}, expected positive widths")
        if not self.channels or len(self.channels) != len(self.kernel_sizes):
            raise ConfigError(f"channels={self.channels!r} and kernel_sizes={self.kernel_sizes!r}"
                              " must be non-empty and of equal length")
        if not all(c >= 1 for c in self.channels) or not all(k >= 1 for k in self.kernel_sizes):
            raise ConfigError(f"channels={self.channels!r}, kernel_sizes={self.kernel_sizes!r},"
                              " expected positive ints")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout}, expected 0 <= dropout < 1")

    @classmethod
    def for_data(cls, input_shape: tuple[int, ...], n_classes: int, arch: str | None = None,
                 **overrides: Any) -> ArchConfig:
        """Pick the arch from the data's shape unless given: (C, T) -> cnn1d, (F,) -> mlp."""
        if arch is None:
            arch = "cnn1d" if len(input_shape) == 2 else "mlp"
        return cls(arch=arch, input_shape=tuple(int(d) for d in input_shape),
                   n_classes=int(n_classes), **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ArchConfig:
        """Inverse of `to_dict`; unknown or ill-typed keys raise ConfigError."""
        if not isinstance(raw, dict):
            raise ConfigError(f"arch: expected an object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"arch: unknown key(s) {unknown} (known: {sorted(known)})")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        try:
            return cls(**kw)
        except TypeError as exc:  # missing required key, or a comparison on a wrong type
            raise ConfigError(f"arch: {exc}") from None


class Normalize(nn.Module):
    """``(x - mean) / std`` with fixed buffers shaped to broadcast over one sample.

    mean/std have one value per channel for ``(C, T)`` input and per feature for ``(F,)``.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, input_shape: tuple[int, ...]):
        super().__init__()
        n = input_shape[0]
        mean = np.asarray(mean, np.float32).reshape(-1)
        std = np.asarray(std, np.float32).reshape(-1)
        if mean.shape != (n,) or std.shape != (n,):
            raise ConfigError(f"normalization: mean {mean.shape} / std {std.shape}, expected ({n},)"
                              f" for input_shape {input_shape}")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ConfigError("normalization: mean/std must be finite and std > 0")
        bshape = (n, 1) if len(input_shape) == 2 else (n,)
        self.register_buffer("mean", torch.from_numpy(mean.reshape(bshape).copy()))
        self.register_buffer("std", torch.from_numpy(std.reshape(bshape).copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # (B, C, T) or (B, F)


class MLPEncoder(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = int(np.prod(cfg.input_shape))
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = h
        layers += [nn.Linear(width, cfg.latent_dim), nn.ReLU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, F) or (B, C, T) -> (B, latent_dim)


class CNN1dEncoder(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        blocks: list[nn.Module] = []
        in_ch = cfg.input_shape[0]
        for i, (ch, k) in enumerate(zip(cfg.channels, cfg.kernel_sizes, strict=True)):
            # Striding after the first block keeps the cost low on long windows.
            blocks += [nn.Conv1d(in_ch, ch, k, stride=1 if i == 0 else 2, padding=k // 2,
                                 bias=False),
                       nn.BatchNorm1d(ch), nn.ReLU()]
            in_ch = ch
        self.blocks = nn.Sequential(*blocks)
        self.to_latent = nn.Sequential(nn.Linear(in_ch, cfg.latent_dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x)          # (B, C, T) -> (B, C', T')
        h = h.mean(dim=-1)          # (B, C')   global average pool
        return self.to_latent(h)    # (B, latent_dim)


class ReverieNet(nn.Module):
    """Normalize -> encoder -> head; `embed` gives the latent the device stores."""

    def __init__(self, cfg: ArchConfig, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.cfg = cfg
        self.normalize = Normalize(mean, std, cfg.input_shape)
        self.encoder = MLPEncoder(cfg) if cfg.arch == "mlp" else CNN1dEncoder(cfg)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.latent_dim, cfg.n_classes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalize(x))  # (B, ...) raw -> (B, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))  # (B, n_classes) logits


def build_model(cfg: ArchConfig, mean: np.ndarray, std: np.ndarray) -> ReverieNet:
    """Build the (untrained) module; mean/std are per channel (C, T) or per feature (F,).

    >>> cfg = ArchConfig.for_data((6, 128), n_classes=3)
    >>> net = build_model(cfg, np.zeros(6), np.ones(6))
    >>> net(torch.zeros(2, 6, 128)).shape
    torch.Size([2, 3])
    """
    return ReverieNet(cfg, mean, std)


def normalization_stats(X: np.ndarray, min_std: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (N, C, T) or per-feature (N, F) mean and std, as float32 ``(C,)``/``(F,)``.

    A constant channel (std below ``min_std``) gets std 1 so it maps to 0, not to inf.
    """
    axes = (0, 2) if X.ndim == 3 else (0,)
    X64 = X.astype(np.float64)
    mean = X64.mean(axis=axes)
    std = X64.std(axis=axes)
    std = np.where(std < min_std, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)
