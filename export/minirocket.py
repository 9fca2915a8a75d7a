"""MiniRocket (Dempster, Schmidt & Webb 2021) as a torch module that exports to ONNX.

A class-agnostic transform: 84 fixed kernels of length 9 (weights -1 x6 and 2 x3, the
``C(9, 3)`` positions of the 2s), each at exponentially spaced dilations, with biases
taken from quantiles of the convolution output of random training windows; each feature
is a PPV, the proportion of positions where the convolution exceeds its bias. Multivariate
as sktime's ``MiniRocketMultivariate``: every (dilation, kernel) combination sums a random
subset of the channels (1 to min(C, 9) of them) before convolving. Padding alternates: for
combination (dilation i, kernel k), ``(i + k) % 2 == 0`` counts every position of the
zero-padded ("same") convolution, otherwise only the positions that need no padding.

Features are ordered dilation -> kernel -> bias (sktime's order)::

    params = fit_minirocket(X, n_features=1680, seed=0)       # X (N, C, T), normalized
    rocket = MiniRocket(params)                                # nn.Module
    F = rocket(torch.from_numpy(X))                            # (N, 1680) in [0, 1]

The forward is one ``conv1d`` per dilation (all 84 kernels, channel subsets folded into
the weights, zero padding 4 * dilation), the lowest float added where a kernel does not count, a
comparison with the biases, a cast, a sum and a division by the number of positions
counted: ONNX ops Conv, Concat, Add, Greater, Cast, ReduceSum, Div, Gather. `ppv_oracle` is the slow obvious loop the tests
hold it to.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch
from torch import nn

from agent.errors import ConfigError

N_KERNELS = 84
KERNEL_LENGTH = 9
MAX_DILATIONS_PER_KERNEL = 32
# Added to positions a kernel does not count: the lowest float32, not -inf (int8
# calibration of an Add with an infinite constant computes NaN scales).
NEVER = float(np.finfo(np.float32).min)
# (84, 3): the positions of the three 2s of each kernel (the other six weights are -1).
KERNEL_INDICES = np.array(list(combinations(range(KERNEL_LENGTH), 3)), dtype=np.int64)


def window_batch(n_features: int, length: int, default: int = 256) -> int:
    """Windows per call that keep the transform's F x T comparison tensor near 32 M
    elements (~160 MB with its float copy)."""
    return max(1, min(default, 2 ** 25 // (n_features * length)))


def kernel_weights() -> np.ndarray:
    """(84, 9) float32: -1 everywhere, 2 at the kernel's three positions."""
    w = -np.ones((N_KERNELS, KERNEL_LENGTH), np.float32)
    w[np.arange(N_KERNELS)[:, None], KERNEL_INDICES] = 2.0
    return w


def check_shape(n_channels: int, length: int, n_features: int) -> None:
    if n_features < N_KERNELS or n_features % N_KERNELS:
        raise ConfigError(f"n_features={n_features}, expected a positive multiple of "
                          f"{N_KERNELS} (MiniRocket has {N_KERNELS} kernels)")
    if length < KERNEL_LENGTH + 1:
        raise ConfigError(f"window length {length}, MiniRocket needs >= {KERNEL_LENGTH + 1} "
                          "samples")
    if n_channels < 1:
        raise ConfigError(f"n_channels={n_channels}, expected >= 1")


def fit_dilations(length: int, n_features: int,
                  max_dilations: int = MAX_DILATIONS_PER_KERNEL) -> tuple[np.ndarray, np.ndarray]:
    """Dilations (D,) and features per dilation per kernel (D,), as in the reference code:
    up to ``max_dilations`` exponentially spaced dilations from 1 to (length - 1) / 8."""
    per_kernel = n_features // N_KERNELS
    n_dil = min(per_kernel, max_dilations)
    multiplier = per_kernel / n_dil
    max_exponent = np.log2((length - 1) / (KERNEL_LENGTH - 1))
    dilations, counts = np.unique(
        np.logspace(0, max_exponent, n_dil, base=2).astype(np.int64), return_counts=True)
    counts = (counts * multiplier).astype(np.int64)
    remainder = per_kernel - int(counts.sum())
    i = 0
    while remainder > 0:
        counts[i] += 1
        remainder -= 1
        i = (i + 1) % len(counts)
    return dilations, counts


def quantiles(n: int) -> np.ndarray:
    """The low-discrepancy quantiles of the reference code: frac(k * golden ratio)."""
    return np.array([(k * ((np.sqrt(5) + 1) / 2)) % 1 for k in range(1, n + 1)], np.float32)


@dataclass(frozen=True)
class MiniRocketParams:
    """A fitted transform. ``channel_mask`` (D, 84, C) float32 0/1; ``biases`` (F,) float32
    in feature order (dilation -> kernel -> bias)."""

    n_channels: int
    length: int
    dilations: np.ndarray            # (D,) int64
    features_per_dilation: np.ndarray  # (D,) int64, per kernel
    channel_mask: np.ndarray         # (D, 84, C) float32
    biases: np.ndarray               # (F,) float32

    @property
    def n_features(self) -> int:
        return int(N_KERNELS * self.features_per_dilation.sum())


def _same_conv(x: np.ndarray, weights: np.ndarray, dilation: int) -> np.ndarray:
    """Zero-padded ("same") dilated convolution of x (T,) with weights (9,) -> (T,), float64."""
    pad = (KERNEL_LENGTH - 1) * dilation // 2
    xp = np.pad(x.astype(np.float64), pad)
    T = len(x)
    return sum(float(weights[j]) * xp[j * dilation:j * dilation + T] for j in range(KERNEL_LENGTH))


def fit_minirocket(X: np.ndarray, n_features: int = 1680, seed: int = 0) -> MiniRocketParams:
    """Fit dilations, channel subsets and biases on windows ``X`` (N, C, T) (normalized).

    Seeded: the same X, n_features and seed give the same parameters.
    """
    X = np.asarray(X, np.float32)
    if X.ndim != 3 or len(X) < 1:
        raise ConfigError(f"MiniRocket fits (N, C, T) windows, got shape {X.shape}")
    n, C, T = X.shape
    check_shape(C, T, n_features)
    rng = np.random.default_rng(seed)
    dilations, per_dil = fit_dilations(T, n_features)
    D = len(dilations)
    # Channel subsets per (dilation, kernel): 2**U(0, log2(min(C, 9) + 1)) channels.
    max_exp = np.log2(min(C, KERNEL_LENGTH) + 1)
    n_ch = (2 ** rng.uniform(0, max_exp, D * N_KERNELS)).astype(np.int64)
    mask = np.zeros((D, N_KERNELS, C), np.float32)
    for j, m in enumerate(n_ch):
        mask[j // N_KERNELS, j % N_KERNELS, rng.choice(C, min(int(m), C), replace=False)] = 1.0
    q = quantiles(int(N_KERNELS * per_dil.sum()))
    w = kernel_weights()
    biases = np.zeros(len(q), np.float32)
    start = 0
    for i, d in enumerate(dilations):
        for k in range(N_KERNELS):
            stop = start + int(per_dil[i])
            x = X[rng.integers(n)][mask[i, k] > 0].sum(axis=0)        # (T,) channel subset
            conv = _same_conv(x, w[k], int(d))                        # (T,)
            biases[start:stop] = np.quantile(conv, q[start:stop])
            start = stop
    return MiniRocketParams(C, T, dilations, per_dil, mask, biases)


def ppv_oracle(params: MiniRocketParams, X: np.ndarray, tie_eps: float = 0.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """The slow obvious transform (float64 loops): PPV features (N, F), and the same with
    every conv value within ``tie_eps`` of its bias counted as above (an upper bound: a
    fast path in float32 may round such near ties either way)."""
    X = np.asarray(X, np.float64)
    w = kernel_weights()
    F = params.n_features
    lo, hi = np.zeros((len(X), F)), np.zeros((len(X), F))
    for b, xb in enumerate(X):
        f = 0
        for i, d in enumerate(params.dilations):
            pad = (KERNEL_LENGTH - 1) * int(d) // 2
            for k in range(N_KERNELS):
                x = xb[params.channel_mask[i, k] > 0].sum(axis=0)
                conv = _same_conv(x, w[k], int(d))
                if (i + k) % 2:
                    conv = conv[pad:len(conv) - pad]
                for _ in range(int(params.features_per_dilation[i])):
                    bias = float(params.biases[f])
                    lo[b, f] = np.mean(conv > bias + tie_eps)
                    hi[b, f] = np.mean(conv > bias - tie_eps)
                    f += 1
    return lo, hi


class MiniRocket(nn.Module):
    """The MiniRocket PPV transform: (B, C, T) -> (B, n_features), values in [0, 1].

    Built from the shape alone (buffers zero) so a bundle's weights can be loaded into it,
    or filled from fitted `MiniRocketParams` with `load_params`.

    Few, large ONNX nodes (onnxruntime's cost on one small window is per node): one conv1d
    per dilation, all zero-padded to T; dilations with the same number of biases per
    kernel (``nf``) share one comparison, one cast and one sum; positions a kernel does not
    count (kernels with (i + k) odd count only the positions that need no padding) get
    the lowest float32 added before the comparison; a final gather restores feature order.
    """

    def __init__(self, n_channels: int, length: int, n_features: int):
        super().__init__()
        check_shape(n_channels, length, n_features)
        dilations, per_dil = fit_dilations(length, n_features)
        self.n_channels, self.length, self.n_features = n_channels, length, n_features
        self.dilations = [int(d) for d in dilations]
        self.features_per_dilation = [int(c) for c in per_dil]
        # The kernels with their random channel subsets folded in (0 on unused channels).
        self.register_buffer("weight", torch.zeros(len(dilations), N_KERNELS, n_channels,
                                                   KERNEL_LENGTH))          # (D, 84, C, 9)
        # Dilation groups by nf, in order of first appearance.
        self.group_nf = list(dict.fromkeys(self.features_per_dilation))
        self.groups = [[i for i, nf in enumerate(self.features_per_dilation) if nf == g]
                       for g in self.group_nf]
        offsets = np.concatenate([[0], np.cumsum(N_KERNELS * per_dil)])   # feature offsets
        order = []
        for g, (nf, dils) in enumerate(zip(self.group_nf, self.groups, strict=True)):
            rows = N_KERNELS * len(dils)
            self.register_buffer(f"bias{g}", torch.zeros(rows, nf, 1))      # (84 n_g, nf, 1)
            # Positions a kernel does not count get NEVER added (never above a bias);
            # count = positions it counts.
            hidden = np.zeros((rows, length), np.float32)                   # (84 n_g, T)
            count = np.zeros((rows, 1), np.float32)                         # (84 n_g, 1)
            for j, i in enumerate(dils):
                pad = (KERNEL_LENGTH - 1) * self.dilations[i] // 2
                for k in range(N_KERNELS):
                    lo, hi = (0, length) if (i + k) % 2 == 0 else (pad, length - pad)
                    hidden[j * N_KERNELS + k, :lo] = NEVER
                    hidden[j * N_KERNELS + k, hi:] = NEVER
                    count[j * N_KERNELS + k] = hi - lo
                order.append(np.arange(offsets[i], offsets[i + 1]))
            self.register_buffer(f"hidden{g}", torch.from_numpy(hidden), persistent=False)
            self.register_buffer(f"count{g}", torch.from_numpy(count), persistent=False)
        # order lists the features in computed order; invert it for the gather.
        computed = np.concatenate(order)
        self.register_buffer("order", torch.from_numpy(np.argsort(computed)), persistent=False)

    def load_params(self, params: MiniRocketParams) -> MiniRocket:
        """Set the buffers from fitted parameters (shapes must match this module's)."""
        if (params.n_channels, params.length, params.n_features) != (
                self.n_channels, self.length, self.n_features):
            raise ConfigError(f"MiniRocket params for C={params.n_channels}, T={params.length}, "
                              f"F={params.n_features}; module is C={self.n_channels}, "
                              f"T={self.length}, F={self.n_features}")
        w = torch.from_numpy(kernel_weights())                               # (84, 9)
        mask = torch.from_numpy(params.channel_mask)                         # (D, 84, C)
        self.weight.copy_(mask[..., None] * w[None, :, None, :])
        offsets = np.concatenate([[0], np.cumsum(N_KERNELS * params.features_per_dilation)])
        for g, (nf, dils) in enumerate(zip(self.group_nf, self.groups, strict=True)):
            b = np.concatenate([params.biases[offsets[i]:offsets[i + 1]] for i in dils])
            getattr(self, f"bias{g}").copy_(torch.from_numpy(b).reshape(-1, nf, 1))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The comparison tensor is F x T per window (1,680 x 2,000 floats = 13 MB): eager
        # torch runs large batches in chunks; the exported graph takes what it is given
        # (callers batch with `window_batch`).
        if not torch.jit.is_tracing() and x.shape[0] > window_batch(
                self.n_features, self.length):
            rows = window_batch(self.n_features, self.length)
            return torch.cat([self(x[s:s + rows]) for s in range(0, len(x), rows)])
        # Measured in onnxruntime (1 thread, 6 x 128): a dense conv per dilation beats a
        # channel-sum matmul + depthwise conv (slow grouped conv) ~1.5x.
        feats = []
        for g, dils in enumerate(self.groups):
            conv = torch.cat([nn.functional.conv1d(
                x, self.weight[i], padding=(KERNEL_LENGTH - 1) * self.dilations[i] // 2,
                dilation=self.dilations[i]) for i in dils], dim=1)          # (B, 84 n_g, T)
            conv = conv + getattr(self, f"hidden{g}")                       # (B, 84 n_g, T)
            above = conv.unsqueeze(2) > getattr(self, f"bias{g}")          # (B, 84 n_g, nf, T)
            n_above = above.to(x.dtype).sum(dim=-1)                         # (B, 84 n_g, nf)
            feats.append((n_above / getattr(self, f"count{g}")).flatten(1))  # (B, 84 n_g nf)
        return torch.cat(feats, dim=1)[:, self.order]                       # (B, F)


class MiniRocketFeatures(nn.Module):
    """MiniRocket PPV -> standardize (training statistics) -> reduce: (B, C, T) -> (B, L).

    ``reduce``: "pca" projects on the top ``reduce_dim`` principal axes of the standardized
    training features (fitted in torch, float64 SVD; when there are fewer training windows
    than ``reduce_dim``, the remaining axes are seeded random directions orthogonal to
    them, so no latent unit is constant), "random" on a seeded Gaussian matrix (entries
    N(0, 1 / reduce_dim)), "none" keeps the ``n_features`` standardized features. Every
    fitted value is a buffer: `fit` once, then the module is frozen and the bundle's
    weights.npz holds it.
    """

    def __init__(self, n_channels: int, length: int, n_features: int, reduce: str,
                 reduce_dim: int):
        super().__init__()
        self.rocket = MiniRocket(n_channels, length, n_features)
        self.reduce = reduce
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        if reduce != "none":
            self.register_buffer("projection", torch.zeros(n_features, reduce_dim))  # (F, L)

    @torch.no_grad()
    def ppv(self, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """The raw PPV features (N, F) of normalized windows, in batches."""
        return torch.cat([self.rocket(x[s:s + batch]) for s in range(0, len(x), batch)])

    @torch.no_grad()
    def fit(self, x: torch.Tensor, seed: int) -> MiniRocketFeatures:
        """Fit the transform, the feature statistics and the reduction on normalized
        training windows ``x`` (N, C, T)."""
        rocket = self.rocket
        self.rocket.load_params(fit_minirocket(x.numpy(), rocket.n_features, seed))
        F = self.ppv(x).double()                                             # (N, F)
        mean, std = F.mean(dim=0), F.std(dim=0, unbiased=False)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant features -> 0
        self.feature_mean.copy_(mean.float())
        self.feature_std.copy_(std.float())
        if self.reduce != "none":
            Z = (F - mean) / std
            L = self.projection.shape[1]
            gen = torch.Generator().manual_seed(seed)
            if self.reduce == "random":
                P = torch.randn(Z.shape[1], L, generator=gen, dtype=torch.float64) / L ** 0.5
            else:
                P = principal_axes(Z, L, gen)
            self.projection.copy_(P.float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.rocket(x) - self.feature_mean) / self.feature_std         # (B, F)
        return z @ self.projection if self.reduce != "none" else z           # (B, L)


def principal_axes(Z: torch.Tensor, n_axes: int, gen: torch.Generator) -> torch.Tensor:
    """(F, n_axes) orthonormal columns: the top principal axes of the centred rows of
    ``Z`` (N, F), each signed so its largest entry is positive; if the data has fewer
    axes (rank < n_axes), seeded random orthonormal directions orthogonal to them."""
    Zc = Z - Z.mean(dim=0)
    _, S, Vh = torch.linalg.svd(Zc, full_matrices=False)                    # Vh (r, F)
    rank = int((S > S.max() * 1e-9).sum()) if len(S) else 0
    V = Vh[:min(rank, n_axes)].T                                             # (F, k)
    signs = torch.sign(V[V.abs().argmax(dim=0), torch.arange(V.shape[1])])
    V = V * torch.where(signs == 0, torch.ones_like(signs), signs)
    if V.shape[1] < n_axes:
        R = torch.randn(Z.shape[1], n_axes - V.shape[1], generator=gen, dtype=Z.dtype)
        R = R - V @ (V.T @ R)
        Q, _ = torch.linalg.qr(R)
        V = torch.cat([V, Q], dim=1)
    return V
