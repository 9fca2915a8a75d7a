"""Sparse codes of latents: k winners among m units (about 2% active).

Two encoders share one kernel (`kernels.project_kwta`):

* a fixed random expansion ``P`` (d, m) drawn once from ``seed``, then k-winners-take-all
  (FlyHash-style, Dasgupta et al. 2017);
* a bundle's top-k sparse autoencoder, ``top_k(relu(W_enc x + b_enc))``, when the bundle
  ships one (`SparseCoder.from_sae`).

Why a dense Gaussian expansion and not the fly's sparse binary one: with zero-mean
Gaussian weights, k-WTA is an angular locality-sensitive hash for any input, signed or not:
the code depends only on the latent's direction (invariant to positive scaling), and
latents at small cosine distance share many units, which matches the cosine index of the
episodic memory. A sparse binary projection sums raw input values, so for our split-point
latents (after a ReLU, all non-negative) the units wired to the largest-mean inputs win for
every input. The price of density, d*m multiply-adds (131k for d=64, m=2048), is ~20 us per
latent, and the matrix is 512 KB.

Centring matters either way: non-negative latents share a dominant mean direction, so
without it a few hundred units win for every input and codes of different classes overlap
(measured in the tests). Pass ``center`` (the mean training latent, e.g. from the bundle)
and the coder projects ``latent - center``; it is folded into the bias, so it costs nothing.

The projection is state, not just a seed: numpy does not promise identical random streams
across versions, so checkpoints store ``state_arrays()`` and restore with `from_state`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.errors import ConfigError
from agent.memory import kernels
from agent.memory._checks import float_array
from agent.memory.errors import MemoryInputError, MemoryStateError


@dataclass(frozen=True)
class SparseCoderConfig:
    n_units: int = 2048          # m, units of the expansion
    active_fraction: float = 0.02
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.n_units, int) or self.n_units < 1:
            raise ConfigError(f"n_units={self.n_units!r}, expected an int >= 1")
        if not 0.0 < self.active_fraction <= 1.0:
            raise ConfigError(f"active_fraction={self.active_fraction!r}, expected 0 < fraction <= 1")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r}, expected an int >= 0")

    @property
    def k(self) -> int:
        """Active units per code: ``round(n_units * active_fraction)``, at least 1."""
        return max(1, min(self.n_units, round(self.n_units * self.active_fraction)))


class SparseCoder:
    """Latents (B, d) to sparse codes (B, k): sorted int32 ids of the k active units.

    >>> coder = SparseCoder(64, SparseCoderConfig(n_units=2048, active_fraction=0.02))
    >>> coder.encode(np.ones((3, 64), "f4")).shape
    (3, 41)
    """

    def __init__(self, latent_dim: int, config: SparseCoderConfig = SparseCoderConfig(),
                 center=None):
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ConfigError(f"latent_dim={latent_dim!r}, expected an int >= 1")
        self.latent_dim = latent_dim
        self.config = config
        self.n_units = config.n_units
        self.k = config.k
        self.kind = "random"
        rng = np.random.default_rng(config.seed)
        # N(0, 1/d): unit-variance activations for unit-norm latents (scale is irrelevant
        # to k-WTA, but keeps values in a comfortable float32 range).
        self.projection_ = (rng.standard_normal((latent_dim, config.n_units), dtype=np.float32)
                            / np.float32(np.sqrt(latent_dim)))          # (d, m)
        self.bias_ = np.zeros(config.n_units, dtype=np.float32)        # (m,)
        if center is not None:   # (x - c) @ P = x @ P - c @ P
            c = float_array(center, name="center", shape=(latent_dim,)).astype(np.float64)
            self.bias_ = (-(c @ self.projection_)).astype(np.float32)
        self.relu = False

    @classmethod
    def from_sae(cls, W_enc, b_enc, k: int) -> SparseCoder:
        """A bundle's top-k sparse autoencoder: code = top_k(relu(W_enc @ x + b_enc)).

        W_enc (m, d), b_enc (m,), 1 <= k <= m. Units that tie (e.g. several at 0 after
        the ReLU when fewer than k are positive) go to the lower unit index.
        """
        W = np.asarray(W_enc)
        if W.ndim != 2:
            raise MemoryInputError(f"W_enc has shape {W.shape}, expected (n_units, latent_dim)")
        m, d = W.shape
        W = float_array(W, name="W_enc", shape=(m, d))
        b = float_array(b_enc, name="b_enc", shape=(m,))
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= m:
            raise ConfigError(f"k={k!r}, expected an int in [1, {m}] (n_units of W_enc)")
        self = cls.__new__(cls)
        self.latent_dim = d
        self.config = SparseCoderConfig(n_units=m, active_fraction=int(k) / m)
        self.n_units = m
        self.k = int(k)
        self.kind = "sae"
        self.projection_ = np.ascontiguousarray(W.T)                  # (d, m)
        self.bias_ = b                                                # (m,)
        self.relu = True
        return self

    def encode(self, latents) -> np.ndarray:
        """latents (B, d) finite floats -> (B, k) int32 active unit ids, ascending per row."""
        x = float_array(latents, name="latents", shape=(None, self.latent_dim))   # (B, d)
        return kernels.project_kwta(x, self.projection_, self.bias_, self.k, self.relu)

    def encode_one(self, latent) -> np.ndarray:
        """latent (d,) -> (k,) int32 active unit ids, ascending."""
        x = float_array(latent, name="latent", shape=(self.latent_dim,))
        return kernels.project_kwta(x[None, :], self.projection_, self.bias_, self.k, self.relu)[0]

    # ------------------------------------------------------------------ state

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to rebuild this coder; names are stable file keys."""
        return {
            "projection": self.projection_.copy(),
            "bias": self.bias_.copy(),
            "k": np.array(self.k, dtype=np.int64),
            "relu": np.array(self.relu, dtype=np.bool_),
        }

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray]) -> SparseCoder:
        """Rebuild from `state_arrays()`; shapes and dtypes are checked, not trusted."""
        missing = {"projection", "bias", "k", "relu"} - set(arrays)
        if missing:
            raise MemoryStateError(f"sparse coder state lacks {sorted(missing)}")
        P = np.asarray(arrays["projection"])
        if P.ndim != 2 or P.dtype != np.float32:
            raise MemoryStateError(f"projection has shape {P.shape} dtype {P.dtype}, "
                                   "expected (latent_dim, n_units) float32")
        d, m = P.shape
        b = np.asarray(arrays["bias"])
        if b.shape != (m,) or b.dtype != np.float32:
            raise MemoryStateError(f"bias has shape {b.shape} dtype {b.dtype}, expected ({m},) float32")
        k = int(np.asarray(arrays["k"]))
        if not 1 <= k <= m:
            raise MemoryStateError(f"k={k}, expected 1 <= k <= {m}")
        if not (np.isfinite(P).all() and np.isfinite(b).all()):
            raise MemoryStateError("sparse coder state holds non-finite weights")
        self = cls.__new__(cls)
        self.latent_dim, self.n_units, self.k = d, m, k
        self.relu = bool(np.asarray(arrays["relu"]))
        self.kind = "sae" if self.relu else "random"
        self.config = SparseCoderConfig(n_units=m, active_fraction=k / m)
        self.projection_ = np.array(P, dtype=np.float32, order="C")
        self.bias_ = np.array(b, dtype=np.float32, order="C")
        return self
