"""``reverie bench sleep``: consolidation cost, numba vs the same update in torch.

Two measurements in one run, on one core (run under ``taskset -c 0`` to pin it):
* the adapter update alone on ``--samples`` replayed latents (forward, backward, Adam with
  gradient clipping), written with the numba kernels of `agent.sleep` and in torch
  (`export.sleep_reference`), same shapes, same batches; best of ``--repeats``;
* with ``--bundle``: a whole `Learner.sleep` (replay sampling, pseudo-latents, training,
  the validation gate) after the learner learned ``--episodes`` windows of the held-out
  classes of ``--data``.
"""

from __future__ import annotations

import argparse
import time

from agent.bench.cli import environment, print_table, write_json


def register(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("sleep", help="consolidation: numba adapter update vs torch")
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--dims", default="64,128,64,4,256,64,5",
                   help="head shapes as comma lists separated by ':' (default: both bundle heads)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bundle", default=None, help="also time a full Learner.sleep on this bundle")
    p.add_argument("--data", default=None, help="NPZ dataset of the bundle (with --bundle)")
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_sleep)


def _shapes(spec: str) -> list[tuple[int, ...]]:
    if spec == "64,128,64,4,256,64,5":
        return [(64, 128, 64, 4), (256, 64, 5)]
    return [tuple(int(x) for x in part.split(",")) for part in spec.split(":")]


def cmd_sleep(args: argparse.Namespace) -> int:
    import torch

    from export.sleep_reference import compare

    torch.set_num_threads(1)
    rows = []
    for dims in _shapes(args.dims):
        r = compare(n_samples=args.samples, dims=dims, rank=args.rank,
                    batch_size=args.batch_size, repeats=args.repeats)
        rows.append({"what": f"adapter update, head {'-'.join(map(str, dims))}", **r})
    print_table(rows, ["what", "n_samples", "numba_s", "torch_s", "speedup",
                       "max_param_diff_50_steps"],
                title=f"consolidating {args.samples} replayed samples, rank {args.rank}, "
                      f"batch {args.batch_size}, 1 thread")
    full = None
    if args.bundle:
        full = _full_sleep(args)
        print(f"Learner.sleep on {args.bundle}: {full['duration_s']:.2f} s, "
              f"{full['samples_replayed']} samples replayed, accepted={full['accepted']} "
              f"({full['reason']})")
    write_json(args.json, {"bench": "sleep", "environment": environment(), "results": rows,
                           "learner_sleep": full})
    return 0


def _full_sleep(args: argparse.Namespace) -> dict:
    import numpy as np

    from agent.dataset import load_dataset
    from agent.learner import Learner, LearnerConfig, SleepConfig

    if not args.data:
        raise SystemExit("--bundle needs --data (the dataset the bundle was trained from)")
    learner = Learner.from_bundle(args.bundle, LearnerConfig(
        capacity=max(1000, 2 * args.episodes), sleep=SleepConfig(replay_samples=args.samples)))
    ds = load_dataset(args.data)
    names = np.array([ds.classes[i] for i in ds.y])
    new = [c for c in ds.classes if c not in learner.classes]
    rng = np.random.default_rng(0)
    for i in rng.permutation(np.flatnonzero(np.isin(names, new)))[: args.episodes]:
        learner.learn_one(ds.X[i], names[i])
    t0 = time.perf_counter()
    report = learner.sleep(budget_s=60.0)
    out = report.to_dict()
    out["wall_s"] = time.perf_counter() - t0
    return out
