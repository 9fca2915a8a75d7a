"""``reverie bench cl``: arguments, `run` (base bundle, latents, every method through
`protocol.run_method`, the joint upper bound, the result dict), the printed tables, the
issue's targets, JSON and plot.

Importing this module stays cheap (`agent.cli` loads it for every ``reverie`` command):
the protocol, torch and river are imported by the handler.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np

from agent.errors import ConfigError

if TYPE_CHECKING:
    from export.bench_cl.protocol import CLConfig

MIN_ACC = 0.95                 # issue 5's target on sklearn digits (base 0-4, memory 500)
MAX_BASE_FORGETTING = 0.01     # 1 point
NOT_BASELINES = ("reverie", "reverie_no_sleep")


def register(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "cl", help="class-incremental benchmark: reverie vs baselines on an NPZ dataset",
        description="Class-incremental protocol (issue 5): train a base bundle on the first "
                    "K classes, stream the other classes as T tasks (each window once, with "
                    "its label), evaluate on every class seen so far after each task; reverie "
                    "against nearest class mean, streaming LDA, naive head fine-tuning, "
                    "experience replay, river's online learners and the joint upper bound, "
                    "all in the same run with the same memory budget.")
    p.add_argument("--data", type=Path, required=True, metavar="D.npz",
                   help="NPZ dataset (agent/dataset.py format)")
    p.add_argument("--base-classes", type=int, default=None, metavar="K",
                   help="base classes: the first K in the dataset's order (default: half)")
    p.add_argument("--tasks", type=int, default=None, metavar="T",
                   help="tasks the other classes are split into, in order (default: one "
                        "class per task)")
    p.add_argument("--memory", type=int, default=500, metavar="M",
                   help="episodes/exemplars every method may store (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of split, training, stream order")
    p.add_argument("--shots", default="1,5,10", metavar="N,..",
                   help="few-shot points on each new class (default 1,5,10)")
    p.add_argument("--sleep-budget", type=float, default=30.0, metavar="S",
                   help="seconds per Learner.sleep between tasks (default 30)")
    p.add_argument("--epochs", type=int, default=None,
                   help="max epochs of base and joint training (default: export's 60, "
                        "early stopping)")
    p.add_argument("--methods", default=None, metavar="A,B,..",
                   help="run only these methods (default: all)")
    p.add_argument("--reverie", action="append", default=[], metavar="KEY=VALUE",
                   help="override a LearnerConfig field for reverie (repeatable; "
                        "sleep.KEY=VALUE for SleepConfig); default: none, the learner's "
                        "defaults with capacity = --memory")
    p.add_argument("--json", type=Path, required=True, metavar="OUT.json")
    p.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                   help="accuracy after each task per method (PNG)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_cl)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,5,10") \
            from None
    return vals


def targets(result: dict) -> list[dict]:
    """The issue's rules, checked on this run (reverie against the run's baselines)."""
    methods = result["methods"]
    if "reverie" not in methods:
        return []
    rev = methods["reverie"]
    out = []
    baselines = {k: v["acc"] for k, v in methods.items() if k not in NOT_BASELINES}
    if baselines:
        best = max(baselines, key=baselines.get)
        out.append({"target": "reverie ACC ahead of every baseline",
                    "measured": f"{100 * rev['acc']:.1f} % vs best baseline {best} "
                                f"{100 * baselines[best]:.1f} %",
                    "met": rev["acc"] > baselines[best]})
    out.append({"target": f"reverie base-class forgetting <= {100 * MAX_BASE_FORGETTING:g} point",
                "measured": f"{100 * rev['base_forgetting']:.2f} points",
                "met": rev["base_forgetting"] <= MAX_BASE_FORGETTING + 1e-12})
    out.append({"target": f"reverie ACC >= {100 * MIN_ACC:g} % (issue 5's target on sklearn "
                          "digits, base 0-4, memory 500)",
                "measured": f"{100 * rev['acc']:.1f} %", "met": rev["acc"] >= MIN_ACC})
    joint = result["joint_upper_bound"]["acc"]
    out.append({"target": "gap to the joint upper bound (ACC), reported",
                "measured": f"{100 * (joint - rev['acc']):.1f} points (joint "
                            f"{100 * joint:.1f} %)", "met": None})
    return out


def _pct(v: float | None) -> float | None:
    return None if v is None else round(100 * v, 1)


def _shot(few: dict, n: int) -> str | None:
    new, old = few.get(str(n)), (few.get("others_acc") or {}).get(str(n))
    return None if new is None else f"{100 * new:.1f}/{100 * old:.1f}"


def print_report(result: dict) -> None:
    from agent.bench.cli import print_table

    proto = result["protocol"]
    rows = []
    for name, m in result["methods"].items():
        fs = m["few_shot"]
        rows.append({"method": name, "ACC %": _pct(m["acc"]), "BWT pts": _pct(m["bwt"]),
                     "forget pts": _pct(m["forgetting"]), "base acc %": _pct(m["base_acc"]),
                     "base forget pts": _pct(m["base_forgetting"]),
                     **{f"{n}-shot new/old %": _shot(fs, n) for n in proto["shots"]},
                     "us/window": round(m["time_per_window_us"], 1),
                     "s/sleep": m["time_per_sleep_s"]})
    joint = result["joint_upper_bound"]
    rows.append({"method": "joint upper bound", "ACC %": _pct(joint["acc"])})
    title = (f"{result['dataset']['name']}: base {len(proto['base_classes'])} classes, "
             f"{proto['n_tasks']} tasks, memory {proto['memory']}, seed {proto['seed']} "
             f"({proto['stream_windows']} stream windows, {proto['test_windows']} test)")
    print_table(rows, list(rows[0]), title=title)
    print(f"joint upper bound over all {proto['test_windows']} test windows: "
          f"{100 * joint['acc_all']:.1f} %")
    print()
    T = proto["n_tasks"]
    curve_rows = [{"method": name, **{("base" if i == 0 else f"task {i}"): _pct(v)
                                      for i, v in enumerate(m["curve"])}}
                  for name, m in result["methods"].items()]
    print_table(curve_rows, list(curve_rows[0]),
                title=f"mean accuracy (%) over seen tasks after each of the {T} tasks")
    print()
    for name, m in result["methods"].items():
        print(f"{name:18s} {m['description']}; stores {m['stored']}")
    print(f"sleep: {proto['sleep']}")
    print("n-shot new/old: accuracy on a new class's test windows after its n-th labelled "
          "window / on the other seen classes at that moment (means over new classes)")
    print()
    for t in result["targets"]:
        mark = "       " if t["met"] is None else ("met    " if t["met"] else "NOT met")
        print(f"{mark}  {t['target']}: {t['measured']}")


def encode_all(enc, X: np.ndarray, batch: int = 256) -> tuple[np.ndarray, float]:
    """Latents of every window (an `agent.inference.Encoder` of the base bundle) and the
    encoder's time per window."""
    t0 = time.perf_counter()
    Z = np.concatenate([enc.encode(X[s:s + batch]) for s in range(0, len(X), batch)])
    return Z, (time.perf_counter() - t0) / max(len(X), 1)


def run(data_path: str | Path, cfg: CLConfig, workdir: Path,
        out: TextIO | None = sys.stderr) -> dict:
    """The whole protocol; returns the result dict the CLI writes as JSON."""
    from agent.bundle import load_bundle, sha256_file
    from agent.dataset import load_dataset
    from agent.learner import LearnerConfig
    from export import train_bundle
    from export.bench_cl.baselines import joint_upper_bound
    from export.bench_cl.protocol import (
        StreamData,
        build_method,
        learner_config,
        make_split,
        method_names,
        run_method,
        sleep_available,
    )

    def log(msg: str) -> None:
        if out is not None:
            print(msg, file=out, flush=True)

    t_start = time.perf_counter()
    data_path = Path(data_path)
    ds = load_dataset(data_path, seed=cfg.seed)
    split = make_split(ds, cfg.base_classes, cfg.tasks, cfg.seed)
    names = method_names(cfg.methods)
    learner_config(LearnerConfig(), cfg.reverie_overrides)    # bad overrides fail before training
    K = len(split.tasks[0])
    log(f"bench cl: training the base bundle on {K} classes ({', '.join(split.names(0))})")
    t0 = time.perf_counter()
    bundle_path = train_bundle(data_path, workdir / "base", base_classes=K, seed=cfg.seed,
                               epochs=cfg.epochs, verbose=False)
    base_train_s = time.perf_counter() - t0
    bundle = load_bundle(bundle_path)           # hashes checked once; the encoder reuses it
    from agent.inference import Encoder

    enc = Encoder(bundle)
    Z, enc_s = encode_all(enc, ds.X)
    Z_test, _ = encode_all(enc, ds.X_test)
    data = StreamData(ds, split, bundle_path, Z, Z_test, cfg)

    results: dict[str, dict] = {}
    for name in names:
        log(f"bench cl: {name}")
        results[name] = run_method(build_method(name, data), ds, split, cfg.shots, log)
    log("bench cl: joint upper bound (all classes, offline)")
    joint = joint_upper_bound(ds, split, cfg)
    training = bundle.manifest.get("training") or {}
    protocol = {
        "base_classes": split.names(0),
        "tasks": [split.names(t) for t in range(1, split.n_tasks + 1)],
        "n_tasks": split.n_tasks, "methods": names, "memory": cfg.memory, "seed": cfg.seed,
        "reverie_overrides": list(cfg.reverie_overrides),
        "shots": list(cfg.shots), "stream_windows": int(sum(len(s) for s in split.stream)),
        "test_windows": int(len(ds.y_test)),
        "order": "tasks in dataset class order; windows within a task in a seeded random "
                 "order, each seen once with its label",
        "evaluation": "after each task, on the test windows of every class seen so far; "
                      "class-incremental (no task id); R[i][j] = accuracy on task j's test "
                      "classes after task i; task 0 = the base classes",
        "sleep": (f"reverie: Learner.sleep(budget_s={cfg.sleep_budget_s:g}) after each task's "
                  "stream, before that task's evaluation; few-shot accuracy is measured "
                  "before it" if sleep_available() else
                  "Learner.sleep does not exist in this build: reverie ran without sleep"),
        "sleep_available": sleep_available(),
        "accuracy_units": "fractions in [0, 1]; bwt and forgetting likewise",
        "base_bundle": {"id": bundle.bundle_id, "arch": bundle.manifest["arch"]["arch"],
                        "latent_dim": bundle.manifest.get("latent_dim"),
                        "test_accuracy": (training.get("metrics") or {}).get("test_accuracy"),
                        "epochs_run": (training.get("metrics") or {}).get("epochs_run"),
                        "train_s": round(base_train_s, 2)},
        "encoder_us_per_window": round(1e6 * enc_s, 2),
        "latent_methods_timing": "ncm, slda, finetune and replay learn from precomputed "
                                 "latents: their time per window excludes the encoder "
                                 "(encoder_us_per_window, batched); reverie's includes it",
    }
    return {"bench": "cl",
            "dataset": {"path": str(data_path), "name": data_path.name,
                        "sha256": sha256_file(data_path), "classes": list(ds.classes),
                        "input_shape": list(ds.input_shape), "n_train": int(len(ds.y)),
                        "n_test": int(len(ds.y_test))},
            "protocol": protocol, "methods": results, "joint_upper_bound": joint,
            "wall_time_s": round(time.perf_counter() - t_start, 2)}


def cmd_cl(args: argparse.Namespace) -> int:
    import tempfile

    from agent.bench.cli import environment, write_json
    from export.bench_cl.protocol import CLConfig

    methods = None
    if args.methods is not None:
        methods = tuple(s.strip() for s in args.methods.split(",") if s.strip())
    cfg = CLConfig(base_classes=args.base_classes, tasks=args.tasks, memory=args.memory,
                   seed=args.seed, shots=_int_list(args.shots, "--shots"),
                   sleep_budget_s=args.sleep_budget, epochs=args.epochs, methods=methods,
                   reverie_overrides=tuple(args.reverie))
    with tempfile.TemporaryDirectory(prefix="reverie-bench-cl-") as tmp:
        result = run(args.data, cfg, Path(tmp), out=None if args.quiet else sys.stderr)
    import torch

    try:
        import river
        river_version = river.__version__
    except ImportError:
        river_version = None
    result["environment"] = {**environment(), "torch": torch.__version__,
                             "river": river_version}
    result["targets"] = targets(result)
    print_report(result)
    write_json(args.json, result)
    print(f"wrote {args.json}")
    if args.plot is not None:
        from export.bench_cl.plot import plot_curves

        print(f"wrote {plot_curves(result, args.plot)}")
    return 0
