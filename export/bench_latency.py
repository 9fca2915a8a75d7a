"""``reverie bench latency``: per-window encoder latency, onnxruntime fp32 / int8 vs torch
eager, and the device's full predict path; registered through ``reverie.bench``.

Everything is measured in one run, one thread, batch 1, interleaved
(`agent.bench.timing.interleaved_times`: every implementation sees the same machine load):

* encoders: onnxruntime fp32 (``encoder.onnx`` with the device's session settings),
  onnxruntime int8 (the ``--int8`` bundle's encoder; without it, every method of
  `export.int8` quantized on the fly with ``--data``'s calibration windows; without data,
  skipped), and torch eager (the model rebuilt from the bundle, ``torch.set_num_threads(1)``,
  ``torch.inference_mode()``). With ``--data``, each also gets its end-to-end accuracy
  (encoder + numpy head) on the test split of the bundle's classes.
* predict path: `agent.learner.Learner.predict_one` (encoder + sparse code + memory query
  + head + fusion) with ``--episodes`` episodes in memory, against the learner's own
  ``Encoder.encode`` (the "encoder alone" of the ratio); also for the ``--int8`` bundle.

Importing this module stays cheap (`agent.cli` loads it for every ``reverie`` command).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

# Targets (issues 3 and 4).
MIN_TORCH_SPEEDUP = 2.0      # onnxruntime fp32 vs torch eager, p50
MAX_INT8_DROP = 1.0          # accuracy points
MAX_PREDICT_P50_US = 150.0
MAX_PREDICT_RATIO = 3.5      # predict_one p50 / encoder p50


def register(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "latency", help="encoder latency: onnxruntime fp32/int8 vs torch eager; predict path",
        description="Per-window encoder latency (p50/p99, 1 thread, batch 1) of onnxruntime "
                    "fp32, onnxruntime int8 and torch eager, and the full predict path with a "
                    "filled memory, measured in one interleaved run.")
    p.add_argument("--bundle", type=Path, required=True, metavar="BUNDLE/")
    p.add_argument("--int8", type=Path, default=None, metavar="BUNDLE-int8/",
                   help="a quantized bundle (reverie export quantize); without it, int8 "
                        "encoders are quantized on the fly from --data")
    p.add_argument("--data", type=Path, default=None, metavar="D.npz",
                   help="NPZ dataset: timing windows, int8 calibration and accuracy")
    p.add_argument("--episodes", type=int, default=10_000,
                   help="episodes in memory for the predict path (default 10000)")
    p.add_argument("--iterations", type=int, default=2000,
                   help="timed windows per implementation (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    p.set_defaults(func=cmd_latency)


def _torch_model(bundle):
    """The torch model rebuilt from the bundle, on one thread."""
    import torch

    from export.weights import model_from_manifest

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # settable only before the process's first parallel work
        pass
    return model_from_manifest(bundle.path, bundle.manifest)


def _encoders(args: argparse.Namespace, bundle, cal, tmp: Path) -> tuple[list[dict], str]:
    """Encoder rows ({"encoder", "fn": x -> latent, "accuracy_pct"}), and where the int8
    encoders came from."""
    import torch

    from agent.bundle import load_bundle
    from agent.errors import BundleError
    from agent.head import Head
    from agent.inference import make_session
    from export.int8 import DESCRIPTIONS, accuracy_pct, batch1, build_candidates, encode_all

    head = Head.from_npz(bundle.file("head.npz"), bundle.manifest)
    rows: list[dict] = []

    def onnx_row(name: str, path: Path, head_: Head) -> None:
        s = make_session(path)
        acc = accuracy_pct(head_, encode_all(s, cal.X_test), cal.y_test) if cal else None
        rows.append({"encoder": name, "fn": batch1(s), "accuracy_pct": acc})

    onnx_row("onnxruntime fp32", bundle.file("encoder.onnx"), head)
    if args.int8 is not None:
        q = load_bundle(args.int8)
        method = (q.manifest.get("quantization") or {}).get("method")
        if method not in DESCRIPTIONS:
            raise BundleError(f"--int8 {args.int8}: not a quantized bundle (no 'quantization' "
                              "section in its manifest)")
        if tuple(q.input.shape) != tuple(bundle.input.shape):
            raise BundleError(f"--int8 {args.int8}: input shape {list(q.input.shape)}, "
                              f"--bundle has {list(bundle.input.shape)}")
        onnx_row(f"onnxruntime int8 {method} (--int8)", q.file("encoder.onnx"),
                 Head.from_npz(q.file("head.npz"), q.manifest))
        source = f"--int8 {q.path} (bundle {q.bundle_id}: {DESCRIPTIONS[method]})"
    elif cal is not None:
        notes = []
        for method, path in build_candidates(bundle.file("encoder.onnx"), cal.X_cal,
                                             tmp).items():
            if isinstance(path, Path):
                onnx_row(f"onnxruntime int8 {method}", path, head)
            else:
                notes.append(f"{method} {path}")
        source = (f"quantized on the fly, calibrated on {len(cal.X_cal)} train windows of "
                  f"{cal.path.name}" + (f" ({'; '.join(notes)})" if notes else ""))
    else:
        source = "skipped: no --int8 bundle and no --data to calibrate with"

    model = _torch_model(bundle)

    def torch_fn(x: np.ndarray):
        with torch.inference_mode():
            return model.embed(torch.from_numpy(x[None]))     # (1, latent_dim)

    acc = None
    if cal is not None:
        with torch.inference_mode():
            acc = accuracy_pct(head, model.embed(torch.from_numpy(cal.X_test)).numpy(),
                               cal.y_test)
    rows.append({"encoder": "torch eager", "fn": torch_fn, "accuracy_pct": acc})
    return rows, source


def _learners(args: argparse.Namespace, rng) -> list[tuple[str, object]]:
    from agent.bench.predict import fill_memory
    from agent.learner import Learner, LearnerConfig

    out = []
    for name, path in (("fp32", args.bundle), ("int8", args.int8)):
        if path is None:
            continue
        learner = Learner.from_bundle(path, LearnerConfig(capacity=args.episodes + 1000,
                                                          seed=args.seed))
        fill_memory(learner, args.episodes, rng)
        out.append((name, learner))
    return out


def _windows(bundle, cal, n: int, seed: int) -> np.ndarray:
    if cal is not None:
        return cal.X_test
    from export.verify import random_inputs

    return random_inputs(bundle, n, seed)


def _predict_rows(learners, X: np.ndarray, iterations: int) -> list[dict]:
    """predict_one and the learner's own Encoder.encode, all interleaved in one run."""
    from agent.bench.timing import interleaved_times, summary

    fns = {}
    for name, learner in learners:
        fns[f"Encoder.encode, {name}"] = lambda x, enc=learner.encoder: enc.encode(x[None])
        fns[f"predict_one, {name}"] = learner.predict_one
    times = interleaved_times(fns, X, iterations)
    rows = []
    for name, learner in learners:
        enc = summary(times[f"Encoder.encode, {name}"])
        pred = summary(times[f"predict_one, {name}"])
        rows.append({"path": f"Encoder.encode ({name} bundle, the encoder alone)", **enc})
        rows.append({"path": f"predict_one ({name} bundle, {len(learner.memory)} episodes)",
                     **pred, "x_encoder": round(pred["p50_us"] / enc["p50_us"], 2)})
    return rows


def _targets(enc_rows: list[dict], pred_rows: list[dict]) -> list[dict]:
    by = {r["encoder"]: r for r in enc_rows}
    fp32, eager = by["onnxruntime fp32"], by["torch eager"]
    out = []
    speedup = eager["p50_us"] / fp32["p50_us"]
    out.append({"target": f"onnxruntime fp32 >= {MIN_TORCH_SPEEDUP:g}x faster than torch eager "
                          "(p50)", "measured": f"{speedup:.2f}x",
                "met": speedup >= MIN_TORCH_SPEEDUP})
    for r in enc_rows:
        if not r["encoder"].startswith("onnxruntime int8"):
            continue
        gain = fp32["p50_us"] / r["p50_us"]
        drop = (None if r["accuracy_pct"] is None or fp32["accuracy_pct"] is None
                else round(fp32["accuracy_pct"] - r["accuracy_pct"], 2))
        met = gain > 1.0 and (drop is not None and drop < MAX_INT8_DROP)
        out.append({"target": f"{r['encoder']}: faster than fp32 with < {MAX_INT8_DROP:g} point "
                              "accuracy drop",
                    "measured": f"{gain:.2f}x fp32 speed, drop "
                                + ("not measured (no --data)" if drop is None else f"{drop:.2f}"),
                    "met": met})
    for r in pred_rows:
        if "x_encoder" in r:
            out.append({"target": f"{r['path']}: p50 <= {MAX_PREDICT_P50_US:g} us and <= "
                                  f"{MAX_PREDICT_RATIO:g}x the encoder alone",
                        "measured": f"{r['p50_us']:.1f} us, {r['x_encoder']:.2f}x",
                        "met": (r["p50_us"] <= MAX_PREDICT_P50_US
                                and r["x_encoder"] <= MAX_PREDICT_RATIO)})
    return out


def cmd_latency(args: argparse.Namespace) -> int:
    import tempfile

    from agent.bench.cli import environment, print_table, write_json
    from agent.bench.timing import interleaved_times, summary
    from agent.bundle import load_bundle
    from agent.errors import ConfigError
    from export.int8 import load_calibration

    if args.iterations < 1 or args.episodes < 0:
        raise ConfigError(f"--iterations {args.iterations} / --episodes {args.episodes}: "
                          "expected >= 1 / >= 0")
    bundle = load_bundle(args.bundle)
    seed = int(((bundle.manifest.get("training") or {}).get("config") or {}).get("seed", 0))
    cal = load_calibration(bundle, args.data, seed=seed) if args.data is not None else None
    X = _windows(bundle, cal, 256, args.seed)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="reverie-bench-latency-") as tmp:
        enc_rows, int8_source = _encoders(args, bundle, cal, Path(tmp))
        times = interleaved_times({r["encoder"]: r.pop("fn") for r in enc_rows}, X,
                                  args.iterations)
    fp32_p50 = summary(times["onnxruntime fp32"])["p50_us"]
    eager_p50 = summary(times["torch eager"])["p50_us"]
    for r in enc_rows:
        r.update(summary(times[r["encoder"]]))
        r["x_faster_than_fp32"] = round(fp32_p50 / r["p50_us"], 2)
        r["x_faster_than_torch"] = round(eager_p50 / r["p50_us"], 2)
    pred_rows = _predict_rows(_learners(args, np.random.default_rng(args.seed)), X,
                              args.iterations)
    targets = _targets(enc_rows, pred_rows)
    load_after = os.getloadavg()

    title = (f"bundle {bundle.bundle_id} ({bundle.manifest['arch']['arch']}, input "
             f"{'x'.join(map(str, bundle.input.shape))}): encoder per window, 1 thread, batch 1,"
             f" {args.iterations} windows each, interleaved")
    print_table(enc_rows, ["encoder", "p50_us", "p99_us", "x_faster_than_torch",
                           "x_faster_than_fp32", "accuracy_pct"], title=title)
    print(f"int8: {int8_source}")
    print()
    print_table(pred_rows, ["path", "p50_us", "p99_us", "x_encoder"],
                title="full predict path (encoder + sparse code + memory query + head + fusion)")
    print()
    for t in targets:
        print(f"{'met    ' if t['met'] else 'NOT met'}  {t['target']}: {t['measured']}")
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    import torch

    write_json(args.json, {
        "bench": "latency", "environment": {**environment(), "torch": torch.__version__},
        "bundle": bundle.bundle_id,
        "bundle_path": str(bundle.path), "arch": bundle.manifest["arch"]["arch"],
        "input_shape": list(bundle.input.shape), "iterations": args.iterations,
        "episodes": args.episodes, "int8": int8_source, "encoders": enc_rows,
        "predict": pred_rows, "targets": targets,
        "accuracy": ("test split of the bundle's classes in " + str(args.data)
                     if cal is not None else None),
        "load_avg_1min": {"before": load_before[0], "after": load_after[0]}})
    if args.json is not None:
        print(f"wrote {args.json}")
    return 0
