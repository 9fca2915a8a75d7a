"""Where to split the model: linear probes of each candidate latent on unseen classes.

    reverie export probe --data digits.npz --base-classes 5 --json probe.json

For each seed, trains the base model once on the first ``base_classes`` classes (the
others are "novel": the device learns them later), then for every candidate split point
takes the latents of the train split of *all* classes, fits a multinomial logistic
regression on the standardized latents, and scores it on the test split: on all
classes, on the base classes' rows and on the novel classes' rows (one probe over all
classes; the row subsets only change what is counted). The normalized raw input is
probed too, as the reference for what a linear read-out can get without an encoder.

A split whose latent keeps the novel classes linearly separable lets the device learn
them on top of a frozen encoder. The table in docs/benchmarks.md, "Split point
(issue 3)", was made by this command and chose `export.model.DEFAULT_SPLIT`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.dataset import Dataset, load_dataset
from agent.errors import ConfigError
from export.classes import select_classes
from export.model import ArchConfig, ReverieNet, min_split
from export.train import TrainConfig, check_trainable, deterministic_torch, train

PROBE_MAX_ITER = 3000


def _logistic_probe(Z_tr: np.ndarray, y_tr: np.ndarray, Z_te: np.ndarray, seed: int
                    ) -> np.ndarray:
    """Predicted labels of ``Z_te`` from a standardized multinomial logistic regression."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:
        raise ConfigError(f"the probe needs scikit-learn ({exc}); "
                          "install it with: pip install 'reverie[dev]'") from None
    import warnings

    clf = make_pipeline(StandardScaler(),
                        LogisticRegression(max_iter=PROBE_MAX_ITER, random_state=seed))
    from threadpoolctl import threadpool_limits

    # One BLAS thread: on a shared 2-core machine the default pool made each fit 25x
    # slower (9.7 s vs 0.4 s for 1437 x 64 latents).
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.filterwarnings("ignore", message=".*(converge|max_iter).*")
        clf.fit(Z_tr, y_tr)
        return clf.predict(Z_te)


@torch.no_grad()
def latents(model: ReverieNet, X: np.ndarray, split: int | None, batch: int = 512
            ) -> np.ndarray:
    """``(N, latent_dim)`` float32 latents at ``split``; ``None`` = the normalized input."""
    model.eval()
    out = []
    for start in range(0, len(X), batch):
        xb = torch.from_numpy(X[start:start + batch])
        z = model.normalize(xb).flatten(1) if split is None else model.embed(xb, split)
        out.append(z.numpy().astype(np.float32))
    return np.concatenate(out)


def candidate_splits(cfg: ArchConfig) -> list[int]:
    return list(range(min_split(cfg.arch), len(cfg.hidden) + 1))


def _accuracies(pred: np.ndarray, y: np.ndarray, base: np.ndarray) -> dict[str, float | None]:
    def acc(rows: np.ndarray) -> float | None:
        return float(np.mean(pred[rows] == y[rows])) if rows.any() else None
    return {"all": acc(np.ones_like(base)), "base": acc(base), "novel": acc(~base)}


def probe_one_seed(ds: Dataset, base_classes: int, arch_cfg: ArchConfig, cfg: TrainConfig,
                   *, verbose: bool = False) -> dict[str, Any]:
    """Train the base model on ``ds``'s first ``base_classes`` classes; probe every split."""
    sub, info = select_classes(ds, base_classes=base_classes)
    check_trainable(sub)
    arch_cfg = replace(arch_cfg, n_classes=len(sub.classes))
    model, metrics = train(sub, cfg, arch_cfg, verbose=verbose)
    base_test = ds.y_test < base_classes  # base = the dataset's first classes
    rows: list[dict[str, Any]] = []
    with deterministic_torch(cfg.threads):
        for split in [None, *candidate_splits(arch_cfg)]:
            t0 = time.perf_counter()
            Z_tr, Z_te = latents(model, ds.X, split), latents(model, ds.X_test, split)
            pred = _logistic_probe(Z_tr, ds.y, Z_te, cfg.seed)
            rows.append({
                "split": split,
                "point": "input" if split is None else arch_cfg.split_description(split),
                "latent_dim": int(Z_tr.shape[1]),
                "accuracy": _accuracies(pred, ds.y_test, base_test),
                "seconds": round(time.perf_counter() - t0, 3),
            })
    return {"seed": cfg.seed, "base_model_test_accuracy": metrics["test_accuracy"],
            "base_model_epochs": metrics["epochs_run"], "rows": rows,
            "held_out_classes": info["held_out_classes"]}


def _mean_std(values: list[float | None]) -> dict[str, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None}
    return {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4)}


def probe_splits(data: str | Path, base_classes: int, *, arch: str | None = None,
                 hidden: Sequence[int] | None = None, seeds: Sequence[int] = (0,),
                 epochs: int | None = None, threads: int | None = None,
                 verbose: bool = False) -> dict[str, Any]:
    """Probe every candidate split of the model trained on the first ``base_classes``.

    Returns a JSON-ready dict: per split, the mean and std over ``seeds`` of the probe
    accuracy on all test rows, the base classes' rows and the novel classes' rows.
    """
    data = Path(data)
    if not seeds:
        raise ConfigError("seeds: expected at least one seed")
    t0 = time.perf_counter()
    runs = []
    arch_cfg = None
    for seed in seeds:
        cfg = TrainConfig(seed=int(seed))
        if epochs is not None:
            cfg = replace(cfg, epochs=epochs)
        if threads is not None:
            cfg = replace(cfg, threads=threads)
        ds = load_dataset(data, seed=cfg.seed)
        if base_classes is None or not 2 <= base_classes < len(ds.classes):
            raise ConfigError(f"base_classes={base_classes!r}, expected an integer in "
                              f"[2, {len(ds.classes) - 1}] (the dataset has {len(ds.classes)} "
                              "classes; the rest are the novel ones)")
        overrides = {} if hidden is None else {"hidden": tuple(int(h) for h in hidden)}
        arch_cfg = ArchConfig.for_data(ds.input_shape, base_classes, arch, **overrides)
        if verbose:
            print(f"probe: seed {seed}: training the base model on {base_classes} of "
                  f"{len(ds.classes)} classes", file=sys.stderr, flush=True)
        runs.append(probe_one_seed(ds, base_classes, arch_cfg, cfg))
    table = []
    for i, row in enumerate(runs[0]["rows"]):
        per_seed = [r["rows"][i] for r in runs]
        table.append({
            "split": row["split"], "point": row["point"], "latent_dim": row["latent_dim"],
            **{f"accuracy_{k}": _mean_std([r["accuracy"][k] for r in per_seed])
               for k in ("all", "base", "novel")},
        })
    assert arch_cfg is not None
    return {
        "data": data.name, "arch": arch_cfg.to_dict() | {"n_classes": None, "split": None},
        "n_classes": len(runs[0]["held_out_classes"]) + base_classes,
        "base_classes": base_classes, "held_out_classes": runs[0]["held_out_classes"],
        "seeds": [int(s) for s in seeds],
        "base_model_test_accuracy": _mean_std([r["base_model_test_accuracy"] for r in runs]),
        "probe": "StandardScaler + LogisticRegression (multinomial, L2, C=1) fit on the "
                 "train split of all classes, scored on the test split",
        "table": table, "runs": runs, "seconds": round(time.perf_counter() - t0, 2),
    }


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of `probe_splits`' result (mean +- std over seeds, in %)."""
    def pct(ms: dict[str, float | None]) -> str:
        if ms["mean"] is None:
            return "-"
        s = f"{100 * ms['mean']:.1f}"
        return s + (f" ± {100 * ms['std']:.1f}" if len(result["seeds"]) > 1 else "")

    n, k = result["n_classes"], result["base_classes"]
    lines = [f"| split | latent taken | dim | all {n} classes | {k} base classes "
             f"| {n - k} novel classes |",
             "|---|---|---|---|---|---|"]
    for r in result["table"]:
        split = "-" if r["split"] is None else str(r["split"])
        lines.append(f"| {split} | {r['point']} | {r['latent_dim']} | {pct(r['accuracy_all'])} "
                     f"| {pct(r['accuracy_base'])} | {pct(r['accuracy_novel'])} |")
    return "\n".join(lines)
