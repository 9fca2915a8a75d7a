"""Export a trained model to ONNX and write a bundle directory atomically.

The bundle is built in a hidden sibling directory (``.NAME.partial-XXXX``) and renamed
into place at the end, so the output path holds either nothing, the old bundle, or the
complete new one; never a half-written one.

torch 2.13 defaults to the torch.export-based ("dynamo") exporter, which needs
``onnxscript``; the ``train`` extra declares only torch and onnx, so we use the
TorchScript exporter (``dynamo=False``), which needs nothing else and handles these
plain feed-forward graphs well.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
import torch

import agent
from agent.bundle import MANIFEST, write_manifest
from agent.dataset import Dataset
from agent.errors import BundleError, ConfigError
from agent.persist.fsio import fsync_dir, fsync_path
from export.model import HEAD_ACTIVATION, Encoder, ReverieNet
from export.sae import SAE_FILE
from export.train import TrainConfig
from export.weights import HEAD, WEIGHTS, head_arrays, save_arrays, save_weights

MODEL = "model.onnx"
ENCODER = "encoder.onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
LATENT_NAME = "latent"
OPSET = 17


def export_onnx(model: torch.nn.Module, path: Path, input_shape: tuple[int, ...],
                output_name: str = OUTPUT_NAME, opset: int = OPSET) -> None:
    """Write ``model`` (eval mode) as ONNX: ``input`` (batch, *input_shape) -> output."""
    model.eval()
    example = torch.zeros((2, *input_shape))  # (B, C, T) or (B, F)
    with warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation on every call.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[output_name],
            dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
            do_constant_folding=True)


def build_manifest(*, name: str, model: ReverieNet, ds: Dataset, train_cfg: TrainConfig,
                   metrics: dict[str, Any], dataset_info: dict[str, Any] | None = None,
                   class_info: dict[str, Any] | None = None,
                   latent_stats: dict[str, Any] | None = None,
                   sae_report: dict[str, Any] | None = None,
                   exemplars: dict[str, Any] | None = None,
                   opset: int = OPSET) -> dict[str, Any]:
    """Everything the manifest says except ``format_version`` and ``files``.

    ``ds`` is the dataset as trained (after any class subset); ``class_info`` says what
    the full dataset had (`export.classes.select_classes`).
    """
    cfg = model.cfg
    class_info = class_info or {"dataset_classes": list(ds.classes), "held_out_classes": []}
    head_dims = list(cfg.widths[cfg.split:])
    manifest = {
        "name": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "input": {
            "shape": list(cfg.input_shape),
            "channels": list(ds.channels) if ds.channels is not None else None,
            "sample_rate_hz": ds.sample_rate_hz,
        },
        "normalization": {
            "per": "channel" if len(cfg.input_shape) == 2 else "feature",
            "mean": [float(v) for v in model.normalize.mean.reshape(-1).tolist()],
            "std": [float(v) for v in model.normalize.std.reshape(-1).tolist()],
            "baked_into_graph": True,
        },
        "classes": list(ds.classes),
        "dataset_classes": list(class_info["dataset_classes"]),
        "held_out_classes": list(class_info["held_out_classes"]),
        "latent_dim": cfg.latent_dim,
        "split": {"index": cfg.split, "n_hidden": len(cfg.hidden),
                  "point": cfg.split_description()},
        "encoder": {"file": ENCODER, "input_name": INPUT_NAME, "output_name": LATENT_NAME,
                    "output_shape": [cfg.latent_dim]},
        "head": {"file": HEAD, "n_layers": len(head_dims) - 1, "dims": head_dims,
                 "activation": HEAD_ACTIVATION,
                 "schema": "W{i} (out, in), b{i} (out,) float32 for i < n_layers: "
                           "h = act(h @ W{i}.T + b{i}), no act after the last layer"},
        "arch": cfg.to_dict(),
        "onnx": {"input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "opset": opset,
                 "exporter": "torchscript"},
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "reverie": agent.__version__,
            "python": platform.python_version(),
        },
        "training": {"metrics": metrics, "config": train_cfg.to_dict(),
                     "dataset": dataset_info or {}},
    }
    if latent_stats is not None:
        manifest["latent_stats"] = latent_stats
    if sae_report is not None:
        manifest["sae"] = {"file": SAE_FILE, **sae_report}
    if exemplars is not None:
        manifest["exemplars"] = exemplars
    return manifest


def check_output_dir(out_dir: Path, force: bool, flag: str = "--force") -> None:
    """Refuse an output path that is a file, or a non-empty directory without ``force``
    (the command-line ``flag`` that sets it is named in the message).

    Even with ``force`` only an existing bundle (it has a manifest) is replaced, so a
    mistyped ``--out`` cannot wipe an unrelated directory.
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not force:
        raise ConfigError(f"{out_dir}: exists and is not empty; pass {flag} to replace it")
    if not (out_dir / MANIFEST).is_file():
        raise ConfigError(f"{out_dir}: exists and is not a bundle (no {MANIFEST}); "
                          f"refusing to replace it even with {flag}")


def move_into_place(staging: Path, out_dir: Path, force: bool, flag: str = "--force") -> None:
    """Rename the complete ``staging`` directory to ``out_dir`` (replacing an existing
    bundle there only with ``force``), then fsync the parent directory."""
    check_output_dir(out_dir, force, flag)  # again: the path may have changed meanwhile
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "bundle")
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)  # an empty directory is replaced atomically
    fsync_dir(out_dir.parent)


def write_bundle(out_dir: str | Path, model: ReverieNet, manifest: dict[str, Any], *,
                 force: bool = False, check: Callable[[Path], object] | None = None,
                 extra_arrays: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write model.onnx, encoder.onnx, head.npz, weights.npz, one ``.npz`` per entry of
    ``extra_arrays`` (file name -> arrays, e.g. sae.npz) and manifest.json into
    ``out_dir`` atomically.

    ``check(staging_dir)`` runs on the complete bundle before it is moved into place;
    if it raises, nothing appears at ``out_dir``.
    """
    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, force)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    except OSError as exc:
        raise BundleError(f"{out_dir}: cannot create the bundle directory ({exc})") from None
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700
        opset = manifest["onnx"]["opset"]
        shape = model.cfg.input_shape
        export_onnx(model, staging / MODEL, shape, OUTPUT_NAME, opset)
        export_onnx(Encoder(model), staging / ENCODER, shape, LATENT_NAME, opset)
        save_arrays(staging / HEAD, head_arrays(model))
        save_weights(model, staging / WEIGHTS)
        for fname, arrays in (extra_arrays or {}).items():
            save_arrays(staging / fname, arrays)
        write_manifest(staging, manifest)
        for f in staging.iterdir():
            fsync_path(f)
        if check is not None:
            check(staging)
        move_into_place(staging, out_dir, force)
    except OSError as exc:
        raise BundleError(f"{out_dir}: cannot write the bundle ({exc})") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
