"""``reverie bench predict``: the device's per-window cost, footprint and durability cost.

Measured in one run, one onnxruntime thread, batch 1:
* ``encoder``: encoder.onnx alone (the baseline the full path is compared with);
* ``predict``: `Learner.predict_one` = encoder + sparse code + memory query + head + fusion,
  with the memory holding ``--episodes`` episodes;
* ``learn_durable``: `Learner.learn_one` with ``durable=True`` (fsync before return);
* in a fresh subprocess: import time, time to the first prediction (warm numba cache), and
  the RSS of a process holding a learner with ``--footprint-episodes`` episodes.
Windows are drawn from ``--data`` (NPZ dataset) or, without it, Gaussian noise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import numpy as np

from agent.bench.cli import environment, percentiles, print_table, write_json


def register(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("predict", help="per-window predict path, learn_one, RSS, start-up")
    add_arguments(p)
    p.set_defaults(func=cmd_predict)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, metavar="BUNDLE/", help="the bundle to run")
    p.add_argument("--data", default=None, help="NPZ dataset to draw windows from")
    p.add_argument("--episodes", type=int, default=10_000, help="memory fill for the predict path")
    p.add_argument("--footprint-episodes", type=int, default=100_000,
                   help="memory fill for the RSS footprint measurement (default: 100000)")
    p.add_argument("--iterations", type=int, default=2000,
                   help="timed predictions (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the results here")


def _windows(bundle, data: str | None, n: int, rng) -> np.ndarray:
    if data:
        from agent.dataset import load_dataset

        ds = load_dataset(data, input_shape=bundle.input.shape)
        X = np.concatenate([ds.X, ds.X_test])
        return X[rng.integers(0, len(X), n)]
    return rng.standard_normal((n, *bundle.input.shape)).astype(np.float32)


def fill_memory(learner, n: int, rng) -> None:
    """Add n episodes whose latents are real encoder outputs of jittered windows."""
    if n <= 0:
        return
    base = learner.encoder.encode(_windows(learner.bundle, None, 256, rng))
    codes = learner.sparse_codes(base)            # (256, code_k); code_k = 0 when off
    n_classes = len(learner.classes)
    for i in range(n):
        j = i % len(base)
        h = base[j] * (1 + 0.05 * rng.standard_normal(base.shape[1]).astype(np.float32))
        learner.memory.add(h, codes[j], i % n_classes, 0.5, float(i))


def _time(fn, xs, warm: int = 50) -> list[float]:
    for x in xs[:warm]:
        fn(x)
    out = []
    for x in xs:
        t = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t)
    return out


FOOTPRINT = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from agent.learner import Learner, LearnerConfig
from agent.bench.predict import fill_memory
from agent.bench.memory import rss_mb
t_import = time.perf_counter() - t0
L = Learner.from_bundle(sys.argv[1], LearnerConfig(capacity=max(int(sys.argv[2]), 1)))
x = np.zeros(L.bundle.input.shape, np.float32)
L.predict_one(x)
t_first = time.perf_counter() - t0
fill_memory(L, int(sys.argv[2]), np.random.default_rng(0))
L.predict_one(x)
print(json.dumps({"import_s": t_import, "first_prediction_s": t_first, "rss_mb": rss_mb(),
                  "episodes": len(L.memory), "latent_dim": L.latent_dim}))
"""


def footprint(bundle: str, episodes: int) -> dict:
    out = subprocess.run([sys.executable, "-c", FOOTPRINT, str(bundle), str(episodes)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cmd_predict(args: argparse.Namespace) -> int:
    from agent.learner import Learner, LearnerConfig

    rng = np.random.default_rng(args.seed)
    cap = max(args.episodes, 1) + args.iterations + 100
    learner = Learner.from_bundle(args.bundle, LearnerConfig(capacity=cap, seed=args.seed))
    X = _windows(learner.bundle, args.data, args.iterations, rng)
    enc = percentiles(_time(lambda x: learner.encoder.encode(x[None]), X))
    fill_memory(learner, args.episodes, rng)
    pred = percentiles(_time(learner.predict_one, X))
    rows = [{"path": "encoder.onnx alone (baseline)", **enc},
            {"path": f"predict_one, {len(learner.memory)} episodes", **pred,
             "x_encoder_p50": pred["p50_us"] / enc["p50_us"]}]
    with tempfile.TemporaryDirectory() as tmp:
        durable = Learner.from_bundle(args.bundle, LearnerConfig(
            capacity=cap, surprise_threshold=0.0, durable=True, checkpoint_every=10**9),
            state_dir=tmp)
        labels = (f"c{i % 4}" for i in range(10**9))
        it = iter(labels)
        learn = percentiles(_time(lambda x: durable.learn_one(x, next(it)), X[:500], warm=20))
        durable.close()
    rows.append({"path": "learn_one durable=True (fsync)", **learn})
    print_table(rows, ["path", "p50_us", "p99_us", "x_encoder_p50"],
                title=f"bundle {learner.bundle.bundle_id}, 1 thread, batch 1")
    fp = footprint(args.bundle, args.footprint_episodes)
    print(f"start-up: import {fp['import_s']:.2f} s, first prediction {fp['first_prediction_s']:.2f} s;"
          f" RSS with {fp['episodes']} episodes (dim {fp['latent_dim']}): {fp['rss_mb']:.0f} MB")
    write_json(args.json, {"bench": "predict", "environment": environment(),
                           "bundle": learner.bundle.bundle_id, "results": rows, "footprint": fp})
    return 0
