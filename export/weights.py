"""Plain-array files of a bundle (no pickle): ``weights.npz`` and ``head.npz``.

``weights.npz``: one float32 array per ``state_dict`` key, so a bundle alone rebuilds the
torch model. BatchNorm's integer step counters (``num_batches_tracked``) are left out:
inference never reads them.

``head.npz``: the head for the device (`agent.head.Head`), the dense layers after the
split: ``n_layers`` (int64 scalar) and, for ``i < n_layers``, ``W{i}`` float32
``(out_i, in_i)`` and ``b{i}`` float32 ``(out_i,)``, with
``h_{i+1} = act(h_i @ W{i}.T + b{i})``, ``h_0`` the latent, no activation after the last
layer (its outputs are the logits, one row per class in the manifest's order).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.errors import BundleError, ConfigError
from export.model import ArchConfig, ReverieNet, build_model

WEIGHTS = "weights.npz"
HEAD = "head.npz"
_SKIPPED_SUFFIX = "num_batches_tracked"


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz"
        np.savez(f, **arrays)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    save_arrays(path, {k: v.detach().cpu().numpy().astype(np.float32)
                       for k, v in model.state_dict().items()
                       if not k.endswith(_SKIPPED_SUFFIX)})


def head_arrays(model: ReverieNet) -> dict[str, np.ndarray]:
    """The head's layers (those after ``model.cfg.split``) in the ``head.npz`` schema."""
    layers = list(model.dense)[model.cfg.split:]
    arrays: dict[str, np.ndarray] = {"n_layers": np.array(len(layers), dtype=np.int64)}
    for i, layer in enumerate(layers):
        arrays[f"W{i}"] = layer.weight.detach().cpu().numpy().astype(np.float32)  # (out, in)
        arrays[f"b{i}"] = layer.bias.detach().cpu().numpy().astype(np.float32)    # (out,)
    return arrays


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load ``path`` into ``model``; any missing, extra or misshapen array raises BundleError."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BundleError(f"{path}: not a readable weights file ({exc})") from None
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith(_SKIPPED_SUFFIX)}
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise BundleError(f"{path}: weights do not match the manifest's arch "
                          f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, ref in expected.items():
        a = arrays[k]
        if a.dtype != np.float32 or tuple(a.shape) != tuple(ref.shape):
            raise BundleError(f"{path}: {k!r} is {a.dtype}{list(a.shape)}, "
                              f"expected float32{list(ref.shape)}")
    state = {k: torch.from_numpy(arrays[k]) for k in expected}
    model.load_state_dict(state, strict=False)


def model_from_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> ReverieNet:
    """Rebuild the torch model from a bundle's manifest (`arch`, normalization) and weights."""
    try:
        cfg = ArchConfig.from_dict(manifest.get("arch"))
        norm = manifest.get("normalization") or {}
        mean = np.asarray(norm.get("mean"), np.float32)
        std = np.asarray(norm.get("std"), np.float32)
        model = build_model(cfg, mean, std)
    except (ConfigError, TypeError, ValueError) as exc:
        raise BundleError(
            f"{bundle_dir / 'manifest.json'}: cannot rebuild the model ({exc})") from None
    if cfg.n_classes != len(manifest.get("classes", [])):
        raise BundleError(f"{bundle_dir / 'manifest.json'}: arch.n_classes={cfg.n_classes} but "
                          f"{len(manifest.get('classes', []))} classes")
    load_weights(model, bundle_dir / WEIGHTS)
    # The graph's baked-in normalization must be the one the manifest documents.
    for name, recorded in (("mean", mean), ("std", std)):
        baked = getattr(model.normalize, name).numpy().reshape(-1)
        if not np.array_equal(baked, recorded):
            raise BundleError(f"{bundle_dir / WEIGHTS}: normalize.{name} differs from the "
                              f"manifest's normalization.{name}")
    return model.eval()
