"""The slow system's head in numpy: the bundle's dense layers after the split point.

``head.npz`` (loaded with ``allow_pickle=False``) holds ``n_layers`` (int scalar) and,
for each layer ``i``, ``W{i}`` float32 ``(out_i, in_i)`` and ``b{i}`` float32 ``(out_i,)``;
the manifest's ``head.activation`` (``"relu"``) runs between layers, not after the last,
whose outputs are the logits in the manifest's ``classes`` order::

    h_0 = latent (B, latent_dim)
    h_{i+1} = act(h_i @ W{i}.T + b{i})      logits = h_n (B, n_classes)

Weights are kept per layer (``weights``, ``biases``) so that low-rank adapters
(``W_i + B_i @ A_i``) and extra output rows for classes learned on the device can be
added layer by layer later.

>>> head = Head.from_npz(bundle.file("head.npz"), bundle.manifest)   # doctest: +SKIP
>>> head.logits(encoder.encode(windows)).shape                        # doctest: +SKIP
(8, 5)
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import BundleError

ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda h: np.maximum(h, 0.0, out=h),
    "identity": lambda h: h,
}
MAX_LAYERS = 64


class Head:
    """Dense layers ``W{i}, b{i}`` with an activation between them; numpy float32."""

    def __init__(self, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray],
                 activation: str = "relu"):
        if activation not in ACTIVATIONS:
            raise BundleError(f"head activation={activation!r}, expected one of "
                              f"{sorted(ACTIVATIONS)}")
        if not weights or len(weights) != len(biases):
            raise BundleError(f"head: {len(weights)} weight matrices and {len(biases)} bias "
                              "vectors, expected the same number >= 1")
        self.weights: list[np.ndarray] = []
        self.biases: list[np.ndarray] = []
        width = None
        for i, (W, b) in enumerate(zip(weights, biases, strict=True)):
            W, b = np.asarray(W), np.asarray(b)
            if W.ndim != 2 or W.dtype != np.float32:
                raise BundleError(f"head W{i} is {W.dtype}{list(W.shape)}, expected float32 "
                                  "(out, in)")
            if width is not None and W.shape[1] != width:
                raise BundleError(f"head W{i} has shape {W.shape}, expected ({W.shape[0]}, "
                                  f"{width}) (in = out of layer {i - 1})")
            if b.shape != (W.shape[0],) or b.dtype != np.float32:
                raise BundleError(f"head b{i} is {b.dtype}{list(b.shape)}, expected float32 "
                                  f"[{W.shape[0]}]")
            if not (np.isfinite(W).all() and np.isfinite(b).all()):
                raise BundleError(f"head layer {i} holds NaN/Inf")
            self.weights.append(np.ascontiguousarray(W))
            self.biases.append(np.ascontiguousarray(b))
            width = W.shape[0]
        self.activation = activation
        self._act = ACTIVATIONS[activation]

    @property
    def n_layers(self) -> int:
        return len(self.weights)

    @property
    def latent_dim(self) -> int:
        return self.weights[0].shape[1]

    @property
    def n_classes(self) -> int:
        return self.weights[-1].shape[0]

    @classmethod
    def from_bundle(cls, bundle) -> Head:
        """The bundle's head, built from the bytes `load_bundle` hashed (`Bundle.data`)."""
        return cls.from_npz(bundle.data("head.npz"), bundle.manifest,
                            name=bundle.file("head.npz"))

    @classmethod
    def from_npz(cls, path: str | Path | bytes, manifest: Mapping[str, Any], *,
                 name: str | Path | None = None) -> Head:
        """Load ``head.npz`` (a path, or its bytes) and check it against the manifest
        (activation, latent_dim, number of classes)."""
        source = io.BytesIO(path) if isinstance(path, bytes | bytearray) else Path(path)
        path = Path(name) if name is not None else source if isinstance(source, Path) \
            else Path("head.npz")
        try:
            with np.load(source, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise BundleError(f"{path}: not a readable head file ({exc})") from None
        n = arrays.get("n_layers")
        if n is None or n.shape != () or n.dtype.kind not in "iu" or not 1 <= int(n) <= MAX_LAYERS:
            raise BundleError(f"{path}: n_layers={n!r}, expected an integer scalar in "
                              f"[1, {MAX_LAYERS}]")
        n = int(n)
        expected = {"n_layers"} | {f"{p}{i}" for i in range(n) for p in "Wb"}
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        if missing or extra:
            raise BundleError(f"{path}: keys do not match n_layers={n} (missing {missing[:4]},"
                              f" unexpected {extra[:4]})")
        spec = manifest.get("head") or {}
        try:
            head = cls([arrays[f"W{i}"] for i in range(n)], [arrays[f"b{i}"] for i in range(n)],
                       spec.get("activation", "relu"))
        except BundleError as exc:
            raise BundleError(f"{path}: {exc}") from None
        latent_dim = manifest.get("latent_dim")
        if latent_dim is not None and head.latent_dim != latent_dim:
            raise BundleError(f"{path}: W0 takes {head.latent_dim} inputs, the manifest's "
                              f"latent_dim is {latent_dim}")
        classes = manifest.get("classes")
        if classes is not None and head.n_classes != len(classes):
            raise BundleError(f"{path}: the last layer has {head.n_classes} outputs, the "
                              f"manifest lists {len(classes)} classes")
        return head

    def logits(self, latents: np.ndarray) -> np.ndarray:
        """``latents`` (B, latent_dim) -> logits (B, n_classes), float32."""
        h = np.asarray(latents)
        if h.ndim != 2 or h.shape[1] != self.latent_dim:
            raise ValueError(f"latents have shape {h.shape}, expected (B, {self.latent_dim})")
        h = h.astype(np.float32, copy=False)
        last = self.n_layers - 1
        for i, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ W.T + b                       # (B, out_i)
            if i < last:
                h = self._act(h)
        return h
