"""The model architecture: one frozen dataclass, and the torch module it builds.

The module is ``normalize -> features -> dense layers``, cut at ``split`` into an encoder
and a head::

    raw window (B, C, T) or features (B, F)
      -> normalize   (x - mean) / std, per channel or per feature; buffers, so the
                     exported graph takes raw windows and the device does no scaling
      -> features    mlp: flatten (B, F);  cnn1d: conv blocks + global average pool (B, C');
                     minirocket: MiniRocket PPV (B, n_features), standardized with the
                     training features' statistics, reduced to reduce_dim (PCA fitted on
                     the training features, a seeded random projection, or none); fitted
                     once before training, frozen (buffers)
      -> dense[0..split)          Linear + ReLU      \\  encoder.onnx -> latent (B, latent_dim)
      -> dense[split..L-1)        Linear + ReLU      |  head.npz (numpy on the device,
      -> dense[L-1]               Linear -> logits   /  adapted there)

``split`` is the number of hidden dense layers inside the encoder: 0 takes the latent
right after the features (cnn1d only: for mlp the "encoder" would learn nothing), and
``len(hidden)`` takes it after the last hidden layer (the classic "embedding"). Named
points: ``"early"`` is the smallest allowed split, ``"late"`` the largest. The default
per arch (`DEFAULT_SPLIT`) was chosen by linear probes of latents on classes the base
model never saw (docs/benchmarks.md, "Split point (issue 3)").

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
from export.minirocket import MiniRocketFeatures, check_shape, window_batch

ARCHS = ("mlp", "cnn1d", "minirocket")
WINDOW_ARCHS = ("cnn1d", "minirocket")  # need (C, T) windows
FROZEN_FEATURE_ARCHS = ("minirocket",)  # features fitted once, then frozen
REDUCTIONS = ("pca", "random", "none")
SPLIT_NAMES = ("early", "late")
# Chosen by measurement (export/probe.py, docs/benchmarks.md): the earliest split keeps
# the most linearly decodable information about classes the base model never saw.
DEFAULT_SPLIT = {"mlp": "early", "cnn1d": "early", "minirocket": "early"}
HEAD_ACTIVATION = "relu"
MINIROCKET_HIDDEN = (128,)


def min_split(arch: str) -> int:
    """The smallest split: mlp's encoder needs one learned layer; cnn1d's convs and
    minirocket's transform are one."""
    return 1 if arch == "mlp" else 0


def resolve_split(arch: str, hidden: tuple[int, ...], split: int | str | None) -> int:
    """``split`` as an index in ``[min_split(arch), len(hidden)]``; names and None resolved.

    >>> resolve_split("mlp", (128, 64), "early"), resolve_split("cnn1d", (128, 64), "late")
    (1, 2)
    """
    lo, hi = min_split(arch), len(hidden)
    if split is None:
        split = DEFAULT_SPLIT.get(arch, "early")
    if isinstance(split, str):
        s = split.strip().lower()
        if s in SPLIT_NAMES:
            return lo if s == "early" else hi
        if not s.lstrip("-").isdigit():
            raise ConfigError(f"split={split!r}, expected one of {list(SPLIT_NAMES)} or an "
                              f"integer in [{lo}, {hi}]")
        split = int(s)
    if isinstance(split, bool) or not isinstance(split, int | np.integer) or not lo <= split <= hi:
        raise ConfigError(f"split={split!r}, expected an integer in [{lo}, {hi}] for arch "
                          f"{arch!r} with hidden={list(hidden)} (or {list(SPLIT_NAMES)})")
    return int(split)


@dataclass(frozen=True)
class ArchConfig:
    """Architecture hyper-parameters; validated at construction.

    ``mlp`` takes ``(F,)`` features (or flattens ``(C, T)`` windows); ``cnn1d`` takes
    ``(C, T)`` windows through conv blocks (``channels``, ``kernel_sizes``; the first
    block keeps the time resolution, later ones halve it) and a global average pool.
    ``minirocket`` takes ``(C, T)`` windows through a MiniRocket transform of
    ``n_features`` PPV features (`export.minirocket`), standardized and reduced to
    ``reduce_dim`` by ``reduce`` ("pca" | "random" | "none": then the latent is the
    ``n_features`` standardized features). All continue with the dense layers ``hidden``
    and a linear output layer. ``split`` (see the module docstring) may be given as a name
    or None; it is stored as an int. Keys added later (``n_features``, ``reduce``,
    ``reduce_dim``) have defaults, so older manifests' ``arch`` dicts still read.
    """

    arch: str
    input_shape: tuple[int, ...]
    n_classes: int
    hidden: tuple[int, ...] = (128, 64)
    split: int | str | None = None
    channels: tuple[int, ...] = (32, 64, 64)
    kernel_sizes: tuple[int, ...] = (7, 5, 3)
    dropout: float = 0.1
    n_features: int = 840
    reduce: str = "pca"
    reduce_dim: int = 256

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"arch={self.arch!r}, expected one of {list(ARCHS)}")
        shape = self.input_shape
        if len(shape) not in (1, 2) or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ConfigError(f"input_shape={shape!r}, expected (C, T) or (F,) of positive ints")
        if self.arch in WINDOW_ARCHS and len(shape) != 2:
            raise ConfigError(f"arch {self.arch!r} needs (C, T) windows, got "
                              f"input_shape={shape!r}; use arch 'mlp'")
        if self.reduce not in REDUCTIONS:
            raise ConfigError(f"reduce={self.reduce!r}, expected one of {list(REDUCTIONS)}")
        if self.arch == "minirocket":
            check_shape(shape[0], shape[1], self.n_features)
            if self.reduce != "none" and (not isinstance(self.reduce_dim, int)
                                          or not 1 <= self.reduce_dim <= self.n_features):
                raise ConfigError(f"reduce_dim={self.reduce_dim!r}, expected an integer in "
                                  f"[1, n_features={self.n_features}]")
        if self.n_classes < 2:
            raise ConfigError(f"n_classes={self.n_classes}, expected >= 2")
        if not all(isinstance(h, int) and h >= 1 for h in self.hidden):
            raise ConfigError(f"hidden={self.hidden!r}, expected positive widths")
        if self.arch == "mlp" and not self.hidden:
            raise ConfigError("hidden=(), arch 'mlp' needs at least one hidden layer "
                              "(the encoder)")
        if not self.channels or len(self.channels) != len(self.kernel_sizes):
            raise ConfigError(f"channels={self.channels!r} and kernel_sizes={self.kernel_sizes!r}"
                              " must be non-empty and of equal length")
        if not all(c >= 1 for c in self.channels) or not all(k >= 1 for k in self.kernel_sizes):
            raise ConfigError(f"channels={self.channels!r}, kernel_sizes={self.kernel_sizes!r},"
                              " expected positive ints")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout}, expected 0 <= dropout < 1")
        object.__setattr__(self, "split", resolve_split(self.arch, self.hidden, self.split))

    @property
    def feature_dim(self) -> int:
        """Width of the features before the dense layers."""
        if self.arch == "mlp":
            return int(np.prod(self.input_shape))
        if self.arch == "minirocket":
            return self.n_features if self.reduce == "none" else self.reduce_dim
        return self.channels[-1]

    @property
    def widths(self) -> tuple[int, ...]:
        """Input and output width of every dense layer: features, hidden..., classes."""
        return (self.feature_dim, *self.hidden, self.n_classes)

    def latent_dim_at(self, split: int) -> int:
        return self.widths[split]

    @property
    def latent_dim(self) -> int:
        return self.latent_dim_at(self.split)

    def window_batch(self, default: int = 256) -> int:
        """Windows per forward call that keep memory bounded (MiniRocket's comparison
        tensor is n_features x T per window); ``default`` for the other archs."""
        if self.arch == "minirocket":
            return window_batch(self.n_features, self.input_shape[1], default)
        return default

    def split_description(self, split: int | None = None) -> str:
        s = self.split if split is None else split
        if s == 0 and self.arch == "minirocket":
            how = ("standardized" if self.reduce == "none" else
                   f"standardized, {self.reduce} to {self.reduce_dim}")
            return (f"after the MiniRocket features ({self.n_features} PPV, {how}), "
                    f"{self.feature_dim} units")
        if s == 0:
            return f"after the conv features (global average pool), {self.feature_dim} units"
        return f"after hidden layer {s} of {len(self.hidden)} (ReLU), {self.hidden[s - 1]} units"

    @classmethod
    def for_data(cls, input_shape: tuple[int, ...], n_classes: int, arch: str | None = None,
                 **overrides: Any) -> ArchConfig:
        """Pick the arch from the data's shape unless given: (C, T) -> minirocket, (F,) -> mlp.

        minirocket by measurement (docs/benchmarks.md, "Representation (issue 12)"): on
        real sensor sets its latent, fitted on the base classes, keeps the classes the base
        model never saw separable (streaming LDA on it: osuleaf 88 % vs cnn1d's 49 %),
        and the model trained on all classes is far closer to MiniRocket + ridge.
        """
        if arch is None:
            arch = "minirocket" if len(input_shape) == 2 else "mlp"
        if arch == "minirocket":
            overrides.setdefault("hidden", MINIROCKET_HIDDEN)
        if arch == "mlp":
            # A wider first layer transfers better to classes the base model never saw
            # (digits, 5-shot device recall, docs/benchmarks.md); cnn1d keeps (128, 64).
            overrides.setdefault("hidden", (256, 64))
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


class CNN1dFeatures(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean(dim=-1)  # (B, C, T) -> (B, C', T') -> (B, C')


def make_features(cfg: ArchConfig) -> nn.Module:
    if cfg.arch == "mlp":
        return nn.Flatten()
    if cfg.arch == "minirocket":
        return MiniRocketFeatures(cfg.input_shape[0], cfg.input_shape[1], cfg.n_features,
                                  cfg.reduce, cfg.reduce_dim)
    return CNN1dFeatures(cfg)


class ReverieNet(nn.Module):
    """normalize -> features -> dense layers; `embed` gives the latent the device stores,
    `head` maps it to logits. ``embed(x, split=s)`` gives the latent of another split
    point of the same trained network (used by the probe)."""

    def __init__(self, cfg: ArchConfig, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.cfg = cfg
        self.normalize = Normalize(mean, std, cfg.input_shape)
        self.features = make_features(cfg)
        w = cfg.widths
        self.dense = nn.ModuleList(nn.Linear(w[i], w[i + 1]) for i in range(len(w) - 1))
        self.drop = nn.Dropout(cfg.dropout)

    def _layers(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        last = len(self.dense) - 1
        for i in range(start, stop):
            h = self.dense[i](h)
            if i < last:
                h = self.drop(torch.relu(h))
        return h

    def embed(self, x: torch.Tensor, split: int | None = None) -> torch.Tensor:
        s = self.cfg.split if split is None else split
        h = self.features(self.normalize(x))        # (B, feature_dim)
        return self._layers(h, 0, s)                 # (B, latent_dim)

    def dense_layers(self, h: torch.Tensor) -> torch.Tensor:
        """All dense layers on the features: (B, feature_dim) -> (B, K) logits (training a
        frozen-feature arch on cached features)."""
        return self._layers(h, 0, len(self.dense))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self._layers(h, self.cfg.split, len(self.dense))  # (B, latent_dim) -> (B, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))  # (B, n_classes) logits


class Encoder(nn.Module):
    """The encoder half of a ReverieNet, as its own module for the ONNX export."""

    def __init__(self, net: ReverieNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)  # (B, ...) raw -> (B, latent_dim)


def build_model(cfg: ArchConfig, mean: np.ndarray, std: np.ndarray) -> ReverieNet:
    """Build the (untrained) module; mean/std are per channel (C, T) or per feature (F,).

    >>> cfg = ArchConfig.for_data((6, 128), n_classes=3)
    >>> net = build_model(cfg, np.zeros(6), np.ones(6))
    >>> net(torch.zeros(2, 6, 128)).shape
    torch.Size([2, 3])
    """
    return ReverieNet(cfg, mean, std)


def normalization_stats(X: np.ndarray, min_std: float = 1e-6, rel_floor: float = 0.1
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (N, C, T) or per-feature (N, F) mean and std, as float32 ``(C,)``/``(F,)``.

    A constant channel (std below ``min_std``) gets std 1 so it maps to 0, not to inf.
    Other stds are floored at ``rel_floor`` times the median std: a nearly constant
    feature (an edge pixel of sklearn digits has std 0.04 against a median of 4.2) would
    otherwise turn a rare unseen value into a huge input (measured on digits 0-4: 93.5%
    validation accuracy without the floor, 97-98% with it).
    """
    axes = (0, 2) if X.ndim == 3 else (0,)
    X64 = X.astype(np.float64)
    mean = X64.mean(axis=axes)
    std = X64.std(axis=axes)
    varying = std >= min_std
    floor = rel_floor * float(np.median(std[varying])) if varying.any() else 0.0
    std = np.where(varying, np.maximum(std, floor), 1.0)
    return mean.astype(np.float32), std.astype(np.float32)
