"""Dataset file in, verified bundle out: the one call the CLI and the demo make.

    from export import train_bundle
    path = train_bundle("digits.npz", "bundles/digits", epochs=30)
    path = train_bundle("digits.npz", "bundles/digits5", base_classes=5, sae=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import sha256_file
from agent.dataset import load_dataset, stratified_split
from agent.learner.state import CLASS_STATS
from export.classes import select_classes
from export.model import ArchConfig
from export.onnx_export import build_manifest, check_output_dir, write_bundle
from export.probe import latents
from export.sae import SAE_FILE, SAEConfig, train_sae
from export.train import TrainConfig, check_trainable, deterministic_torch, train
from export.verify import EXEMPLARS, verify_bundle


def latent_stats(Z: np.ndarray) -> dict[str, Any]:
    """Mean and std per latent unit over the training latents (the device centres sparse
    codes and scales distances with them), and how often each unit is zero."""
    Z64 = Z.astype(np.float64)
    return {"n": len(Z), "mean": [round(float(v), 6) for v in Z64.mean(axis=0)],
            "std": [round(float(v), 6) for v in Z64.std(axis=0)],
            "zero_fraction": round(float(np.mean(Z == 0)), 6)}


EXEMPLARS_PER_CLASS = 64


def class_statistics(Z: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """The sufficient statistics of a shared-covariance Gaussian per class over every
    training latent, for the device's schema readout (`agent.memory.schema`) to start from,
    as a streaming LDA that had seen them all: ``class_counts`` (K,) int64, ``class_means``
    (K, d) float32, ``class_scatter`` (d, d) float32 = sum over classes and latents of
    (z - mu_c)(z - mu_c)^T, summed in float64. Stored as float32 like the latents (the
    device widens them to float64): 4 d^2 + 4 K d bytes, 0.26 MB at d = 256; the rounding
    (~1e-7 relative) is far below the readout's covariance shrinkage (1e-2).
    """
    Z64 = Z.astype(np.float64)                                    # (n, d)
    d = Z.shape[1]
    counts = np.bincount(y, minlength=n_classes).astype(np.int64)  # (K,)
    means, scatter = np.zeros((n_classes, d)), np.zeros((d, d))
    for c in np.flatnonzero(counts):
        Zc = Z64[y == c]                                          # (n_c, d)
        means[c] = Zc.mean(axis=0)
        scatter += (Zc - means[c]).T @ (Zc - means[c])
    return {"class_counts": counts, "class_means": means.astype(np.float32),
            "class_scatter": (0.5 * (scatter + scatter.T)).astype(np.float32)}


def exemplar_arrays(Z: np.ndarray, y: np.ndarray, per_class: int, seed: int,
                    n_classes: int | None = None,
                    held_out: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``exemplars.npz``: a seeded, class-balanced sample of training latents for the
    device to seed its episodic memory with (replay of the base classes), and the
    statistics of all of them for its schema readout.

    ``latents`` (n, d) float32 (all-zero latents skipped: cosine distance needs a
    direction), ``labels`` (n,) int64 indices into the manifest's classes, ``latent_mean``
    (d,) float32 over all training latents, and `class_statistics` over all training
    latents (zero ones included: the device's schema sees every latent) of the
    ``n_classes`` classes (default ``max(y) + 1``). With ``held_out`` (validation rows),
    exemplars are drawn from the other rows and ``novelty_calibration`` is added.
    """
    rng = np.random.default_rng(seed)
    nonzero = np.flatnonzero(np.abs(Z).sum(axis=1) > 0)
    if held_out is not None:
        nonzero = np.setdiff1d(nonzero, held_out)
    rows = []
    for c in np.unique(y):
        mine = nonzero[y[nonzero] == c]
        rows.append(np.sort(rng.permutation(mine)[:per_class]))
    rows = np.concatenate(rows)
    K = int(y.max()) + 1 if n_classes is None else n_classes
    out = {"latents": Z[rows].astype(np.float32), "labels": y[rows].astype(np.int64),
           "latent_mean": Z.astype(np.float64).mean(axis=0).astype(np.float32),
           **class_statistics(Z, y, K)}
    if held_out is not None and len(held_out) >= 2:
        out["novelty_calibration"] = novelty_calibration(Z, y, held_out, out, K)
    return out


NOVELTY_STORED_PER_CLASS = 20   # = LearnerConfig.exemplars_per_class, what a device stores


def novelty_calibration(Z: np.ndarray, y: np.ndarray, held_out: np.ndarray,
                        exemplars: dict[str, np.ndarray], n_classes: int) -> np.ndarray:
    """``novelty_calibration`` (n_held_out, 2) float32: the raw open-set scores of the
    validation latents (``held_out`` rows, which the encoder was not fitted on) the way a
    fresh device scores a window (`agent.learner.novelty.raw_scores`: nearest stored
    exemplar, schema distance), with the schema's statistics of the training rows only, so
    that the device's first calibration is out of sample. In-sample latents look far
    closer than new ones once the latent is a sizeable fraction of the number of training
    windows (docs/architecture.md, "Novelty")."""
    from agent.learner.novelty import raw_scores
    from agent.memory.schema import SchemaReadout

    fit = np.setdiff1d(np.arange(len(y)), held_out)
    stats = class_statistics(Z[fit], y[fit], n_classes)
    center = exemplars["latent_mean"].astype(np.float64)
    schema = SchemaReadout(Z.shape[1])
    ok = stats["class_counts"] > 0
    counts = np.where(ok, stats["class_counts"], 0)
    schema.seed_stats(counts, np.where(ok[:, None], stats["class_means"] - center, 0.0),
                      stats["class_scatter"].astype(np.float64))
    lab = exemplars["labels"]
    keep = np.concatenate([np.flatnonzero(lab == c)[:NOVELTY_STORED_PER_CLASS]
                           for c in np.unique(lab)])
    stored = exemplars["latents"][keep].astype(np.float64) - center
    scores = raw_scores(Z[held_out].astype(np.float64) - center, stored, schema)
    return scores[np.isfinite(scores).all(axis=1)].astype(np.float32)


def train_bundle(data_path: str | Path, out_dir: str | Path, *, arch: str | None = None,
                 epochs: int | None = None, seed: int | None = None,
                 threads: int | None = None, name: str | None = None,
                 force: bool = False, train_config: TrainConfig | None = None,
                 classes: Sequence[str] | None = None, base_classes: int | None = None,
                 split: int | str | None = None, sae: bool | SAEConfig = False,
                 arch_options: dict[str, Any] | None = None, verbose: bool = True) -> Path:
    """Train on the NPZ dataset at ``data_path`` and write a verified bundle to ``out_dir``.

    ``epochs``, ``seed`` and ``threads`` override ``train_config``; ``arch``
    ("mlp" | "cnn1d" | "minirocket") defaults to `ArchConfig.for_data` on the data's shape;
    ``arch_options`` are further `ArchConfig` fields (e.g. ``n_features``, ``reduce``,
    ``reduce_dim``). ``classes`` (names) or
    ``base_classes`` (the first K in the dataset's order) train on a subset; the others
    are recorded as held out. ``split`` ("early" | "late" | an index; see
    `export.model`) sets where the encoder ends. ``sae`` (True or an `SAEConfig`) also
    trains a top-k sparse autoencoder on the training latents (``sae.npz``).

    The bundle is verified (hashes, onnx.checker, parity of model.onnx, encoder.onnx and
    the numpy head) before it is moved into place; on any error nothing is left at
    ``out_dir``.
    """
    data_path, out_dir = Path(data_path), Path(out_dir)
    cfg = train_config or TrainConfig()
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    if seed is not None:
        cfg = replace(cfg, seed=seed)
    if threads is not None:
        cfg = replace(cfg, threads=threads)
    sae_cfg = None
    if sae:
        sae_cfg = sae if isinstance(sae, SAEConfig) else SAEConfig(seed=cfg.seed,
                                                                   threads=cfg.threads)
    check_output_dir(out_dir.absolute(), force)  # fail before training, not after
    full = load_dataset(data_path, seed=cfg.seed)
    ds, class_info = select_classes(full, classes, base_classes)
    check_trainable(ds)
    arch_cfg = ArchConfig.for_data(ds.input_shape, len(ds.classes), arch, split=split,
                                   **(arch_options or {}))

    model, metrics = train(ds, cfg, arch_cfg, verbose=verbose)
    with deterministic_torch(cfg.threads):
        Z_train = latents(model, ds.X, model.cfg.split)
        Z_test = latents(model, ds.X_test, model.cfg.split)
    _, val_rows = stratified_split(ds.y, cfg.val_fraction, cfg.seed)   # as `train` split
    extra = {EXEMPLARS: exemplar_arrays(Z_train, ds.y, EXEMPLARS_PER_CLASS, cfg.seed,
                                        len(ds.classes), held_out=val_rows)}
    sae_report = None
    if sae_cfg is not None:
        held_out = np.isin(np.asarray(full.classes)[full.y_test], class_info["held_out_classes"])
        with deterministic_torch(cfg.threads):
            Z_held_out = latents(model, full.X_test[held_out], model.cfg.split)
        extra[SAE_FILE], sae_report = train_sae(Z_train, Z_test, sae_cfg, Z_held_out)
    manifest = build_manifest(
        name=name or out_dir.absolute().name, model=model, ds=ds, train_cfg=cfg,
        metrics=metrics, class_info=class_info, latent_stats=latent_stats(Z_train),
        sae_report=sae_report,
        exemplars={"file": EXEMPLARS, "per_class": EXEMPLARS_PER_CLASS,
                   "n": len(extra[EXEMPLARS]["labels"]), "class_statistics": list(CLASS_STATS),
                   "n_statistics": len(ds.y)},
        dataset_info={"file": data_path.name, "sha256": sha256_file(data_path),
                      "input_shape": list(ds.input_shape)})
    return write_bundle(out_dir, model, manifest, force=force, extra_arrays=extra,
                        check=lambda staging: verify_bundle(staging, seed=cfg.seed))

