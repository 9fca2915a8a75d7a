"""`AdaptedHead`: the bundle's head plus low-rank adapters and rows for device classes.

For each head layer i (``W_i`` (out_i, in_i), frozen), an adapter ``A_i`` (r, in_i) and
``B_i`` (out_i, r) make the layer ``W_i + B_i @ A_i`` (LoRA, Hu et al. 2021). Classes the
device learned get output rows of their own (full rank: a new class needs its own
direction, not one in A's span): ``N`` (n_new, in_last) on the last hidden layer, a skip
``S`` (n_new, d) from the latent x, and biases ``c`` (n_new,)::

    logits = [ h_last @ (W_last + B_last @ A_last).T + b_last ,  h_last @ N.T + x @ S.T + c ]
              ^ the bundle's classes (0..Kb-1)                    ^ device classes (Kb..K-1)

The skip is there by measurement: the head's hidden layers were trained on the bundle's
classes only and lose part of what separates unseen ones, which the latent keeps (the
split point was chosen for it). On digits (base 0-4, 20 shots of 5-9, rank 4, 3 seeds)
new-class accuracy of the head rose from 0.875 (rows on h_last only) to 0.927.

Inference merges the adapters once into a plain `Head` (numpy, same cost as the bundle's
head) plus one (B, d) @ (d, n_new) product for the skip. A fresh adapter has ``B = 0`` and
a small random ``A``: it computes exactly the bundle's head, and the first gradient on
``B`` is not zero. Instances are immutable, so a learner swaps one for another by
assigning an attribute (atomic for readers).

On disk (inside the learner's checkpoint): arrays ``A{i}``, ``B{i}``, ``N``, ``S``, ``c``
(float32) and a manifest ``{"format", "version", "rank", "n_layers", "dims",
"n_classes", "base_classes", "activation"}`` (`state_arrays`, `manifest`, `from_state`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from agent.errors import StateError
from agent.head import Head

ADAPTER_FORMAT = 1
MAX_RANK = 256
_ACT = {"identity": 0, "relu": 1}


@dataclass(frozen=True)
class Packed:
    """An adapted head as the flat arrays `agent.sleep.kernels` take (see its docstring)."""

    layout: np.ndarray     # (L, 6) int64: n_in, n_out, w_off, b_off, a_off, bb_off
    rank: int
    n_new: int
    nw_off: int            # offset of N in theta; S and c follow it
    act: int               # 1 relu, 0 identity
    wflat: np.ndarray      # (sum out_i * in_i,) frozen weights
    bflat: np.ndarray      # (sum out_i,) frozen biases
    theta: np.ndarray      # (P,) trainable: A_i, B_i for every layer, then N, S, c


class AdaptedHead:
    """A `Head` with adapters ``A_i``, ``B_i`` on every layer and ``n_new`` extra outputs.

    >>> ad = AdaptedHead.fresh(head, rank=4, seed=0)        # doctest: +SKIP
    >>> np.allclose(ad.logits(h), head.logits(h))           # doctest: +SKIP
    True
    """

    def __init__(self, base: Head, A: Sequence[np.ndarray], B: Sequence[np.ndarray],
                 N: np.ndarray, S: np.ndarray, c: np.ndarray, *, version: int = 0):
        L = base.n_layers
        if len(A) != L or len(B) != L:
            raise ValueError(f"adapter has {len(A)} A and {len(B)} B matrices, expected {L} each")
        rank = np.asarray(A[0]).shape[0] if L else 0
        if not 1 <= rank <= MAX_RANK:
            raise ValueError(f"adapter rank {rank}, expected 1..{MAX_RANK}")
        self.A = [_f32(a, (rank, W.shape[1]), f"A{i}") for i, (a, W) in
                  enumerate(zip(A, base.weights, strict=True))]
        self.B = [_f32(b, (W.shape[0], rank), f"B{i}") for i, (b, W) in
                  enumerate(zip(B, base.weights, strict=True))]
        n_in_last = base.weights[-1].shape[1]
        N = np.asarray(N)
        self.N = _f32(N, (N.shape[0] if N.ndim == 2 else -1, n_in_last), "N")
        self.S = _f32(S, (self.N.shape[0], base.latent_dim), "S")
        self.c = _f32(c, (self.N.shape[0],), "c")
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"adapter version {version!r}, expected an int >= 0")
        self.base = base
        self.rank = int(rank)
        self.version = version
        weights = [W + Bi @ Ai for W, Ai, Bi in zip(base.weights, self.A, self.B, strict=True)]
        biases = list(base.biases)
        weights[-1] = np.concatenate([weights[-1], self.N])
        biases[-1] = np.concatenate([biases[-1], self.c])
        # Head validates shapes and finiteness: a diverged adapter cannot be built.
        self.merged = Head(weights, biases, base.activation)

    # ------------------------------------------------------------------ views

    @property
    def n_classes(self) -> int:
        """Outputs: the bundle's classes, then the device classes, in the learner's order."""
        return self.merged.n_classes

    @property
    def base_classes(self) -> int:
        return self.base.n_classes

    @property
    def n_new(self) -> int:
        return int(self.N.shape[0])

    def logits(self, latents: np.ndarray) -> np.ndarray:
        """``latents`` (B, latent_dim), uncentred -> logits (B, n_classes) float32."""
        z = self.merged.logits(latents)                                   # (B, K)
        if self.n_new:
            z[:, self.base_classes:] += np.asarray(latents, np.float32) @ self.S.T
        return z

    # ------------------------------------------------------------------ building

    @classmethod
    def fresh(cls, base: Head, rank: int, seed: int) -> AdaptedHead:
        """Version 0: ``B = 0``, ``A ~ N(0, 1/in)``; computes exactly the bundle's head."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
            raise ValueError(f"rank={rank!r}, expected an int in [1, {MAX_RANK}]")
        rng = np.random.default_rng(seed)
        A = [(rng.standard_normal((rank, W.shape[1])) / np.sqrt(W.shape[1])).astype(np.float32)
             for W in base.weights]
        B = [np.zeros((W.shape[0], rank), np.float32) for W in base.weights]
        n_in = base.weights[-1].shape[1]
        return cls(base, A, B, np.zeros((0, n_in), np.float32),
                   np.zeros((0, base.latent_dim), np.float32), np.zeros(0, np.float32))

    def with_classes(self, n_classes: int) -> AdaptedHead:
        """A copy with outputs for ``n_classes`` classes: new rows start at zero (the
        training pushes them where they belong); same version."""
        if n_classes < self.n_classes:
            raise ValueError(f"n_classes={n_classes} < {self.n_classes}: rows are never removed")
        extra = n_classes - self.n_classes
        N = np.concatenate([self.N, np.zeros((extra, self.N.shape[1]), np.float32)])
        S = np.concatenate([self.S, np.zeros((extra, self.S.shape[1]), np.float32)])
        c = np.concatenate([self.c, np.zeros(extra, np.float32)])
        return AdaptedHead(self.base, self.A, self.B, N, S, c, version=self.version)

    def pack(self) -> Packed:
        """Flat arrays for the kernels; ``theta`` is a fresh copy the caller may train."""
        L = self.base.n_layers
        layout = np.zeros((L, 6), np.int64)
        w_off = b_off = t_off = 0
        for i, W in enumerate(self.base.weights):
            n_out, n_in = W.shape
            layout[i] = (n_in, n_out, w_off, b_off, t_off, t_off + self.rank * n_in)
            w_off += n_out * n_in
            b_off += n_out
            t_off += self.rank * (n_in + n_out)
        wflat = np.concatenate([W.ravel() for W in self.base.weights])
        bflat = np.concatenate(self.base.biases)
        parts = [p for Ai, Bi in zip(self.A, self.B, strict=True) for p in (Ai.ravel(), Bi.ravel())]
        theta = np.concatenate(parts + [self.N.ravel(), self.S.ravel(), self.c])
        return Packed(layout, self.rank, self.n_new, t_off, _ACT[self.base.activation],
                      wflat, bflat, theta.astype(np.float32))

    def unpack(self, theta: np.ndarray, *, version: int) -> AdaptedHead:
        """The adapted head holding ``theta`` (from `pack` of this head, then trained)."""
        theta = np.asarray(theta, dtype=np.float32)
        A, B, t = [], [], 0
        for W in self.base.weights:
            n_out, n_in = W.shape
            A.append(theta[t: t + self.rank * n_in].reshape(self.rank, n_in).copy())
            t += self.rank * n_in
            B.append(theta[t: t + n_out * self.rank].reshape(n_out, self.rank).copy())
            t += n_out * self.rank
        n_in, d, k = self.N.shape[1], self.S.shape[1], self.n_new
        N = theta[t: t + k * n_in].reshape(k, n_in).copy()
        S = theta[t + k * n_in: t + k * (n_in + d)].reshape(k, d).copy()
        c = theta[t + k * (n_in + d):].copy()
        if c.shape != (k,):
            raise ValueError(f"theta has {theta.shape[0]} values, expected {t + k * (n_in + d + 1)}")
        return AdaptedHead(self.base, A, B, N, S, c, version=version)

    # ------------------------------------------------------------------ persistence

    def manifest(self) -> dict:
        return {"format": ADAPTER_FORMAT, "version": self.version, "rank": self.rank,
                "n_layers": self.base.n_layers,
                "dims": [self.base.latent_dim] + [W.shape[0] for W in self.base.weights],
                "base_classes": self.base_classes, "n_classes": self.n_classes,
                "activation": self.base.activation}

    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {f"A{i}": a for i, a in enumerate(self.A)}
        out.update({f"B{i}": b for i, b in enumerate(self.B)})
        out.update(N=self.N, S=self.S, c=self.c)
        return out

    @classmethod
    def from_state(cls, base: Head, arrays: Mapping[str, np.ndarray],
                   manifest: Mapping) -> AdaptedHead:
        """Rebuild from `state_arrays` + `manifest`; StateError names what does not fit."""
        if not isinstance(manifest, Mapping) or manifest.get("format") != ADAPTER_FORMAT:
            fmt = manifest.get("format") if isinstance(manifest, Mapping) else manifest
            raise StateError(f"adapter format {fmt!r}, this agent reads {ADAPTER_FORMAT}")
        dims = [base.latent_dim] + [W.shape[0] for W in base.weights]
        if manifest.get("dims") != dims or manifest.get("activation") != base.activation:
            raise StateError(f"the adapter was trained on a head of dims {manifest.get('dims')} "
                             f"({manifest.get('activation')}), the bundle's head is {dims} "
                             f"({base.activation})")
        L = base.n_layers
        names = [f"A{i}" for i in range(L)] + [f"B{i}" for i in range(L)] + ["N", "S", "c"]
        missing = [n for n in names if n not in arrays]
        if missing:
            raise StateError(f"adapter arrays missing: {missing[:4]}")
        try:
            head = cls(base, [arrays[f"A{i}"] for i in range(L)],
                       [arrays[f"B{i}"] for i in range(L)], arrays["N"], arrays["S"], arrays["c"],
                       version=int(manifest.get("version", -1)))
        except (ValueError, TypeError) as exc:
            raise StateError(f"adapter does not fit the bundle's head: {exc}") from None
        if head.rank != manifest.get("rank") or head.n_classes != manifest.get("n_classes"):
            raise StateError(f"adapter arrays (rank {head.rank}, {head.n_classes} classes) "
                             f"disagree with its manifest {dict(manifest)}")
        return head


def _f32(a, shape: tuple[int, int] | tuple[int], name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.float32 or a.ndim != len(shape) or any(
            s not in (-1, d) for s, d in zip(shape, a.shape, strict=True)):
        raise ValueError(f"adapter {name} is {a.dtype}{list(a.shape)}, expected float32 "
                         f"{list(shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"adapter {name} holds NaN/Inf")
    return np.ascontiguousarray(a)
