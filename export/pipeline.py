"""Dataset file in, verified bundle out: the one call the CLI and the demo make.

    from export import train_bundle
    path = train_bundle("digits.npz", "bundles/digits", epochs=30)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from agent.bundle import sha256_file
from agent.dataset import load_dataset
from export.model import ArchConfig
from export.onnx_export import build_manifest, check_output_dir, write_bundle
from export.train import TrainConfig, check_trainable, train
from export.verify import verify_bundle


def train_bundle(data_path: str | Path, out_dir: str | Path, *, arch: str | None = None,
                 epochs: int | None = None, seed: int | None = None,
                 threads: int | None = None, name: str | None = None,
                 force: bool = False, train_config: TrainConfig | None = None,
                 verbose: bool = True) -> Path:
    """Train on the NPZ dataset at ``data_path`` and write a verified bundle to ``out_dir``.

    ``epochs``, ``seed`` and ``threads`` override ``train_config``; ``arch``
    ("mlp" | "cnn1d") defaults to the data's shape. The bundle is verified (hashes,
    onnx.checker, parity) before it is moved into place; on any error nothing is left
    at ``out_dir``.
    """
    data_path, out_dir = Path(data_path), Path(out_dir)
    cfg = train_config or TrainConfig()
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    if seed is not None:
        cfg = replace(cfg, seed=seed)
    if threads is not None:
        cfg = replace(cfg, threads=threads)
    check_output_dir(out_dir.absolute(), force)  # fail before training, not after
    ds = load_dataset(data_path, seed=cfg.seed)
    check_trainable(ds)
    arch_cfg = ArchConfig.for_data(ds.input_shape, len(ds.classes), arch)

    model, metrics = train(ds, cfg, arch_cfg, verbose=verbose)
    manifest = build_manifest(
        name=name or out_dir.absolute().name, model=model, ds=ds, train_cfg=cfg,
        metrics=metrics,
        dataset_info={"file": data_path.name, "sha256": sha256_file(data_path),
                      "input_shape": list(ds.input_shape)})
    return write_bundle(out_dir, model, manifest, force=force,
                        check=lambda staging: verify_bundle(staging, seed=cfg.seed))
