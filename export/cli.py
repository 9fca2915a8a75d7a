"""``reverie export train|verify``: registered through the ``reverie.commands`` entry point.

Importing this module must stay cheap (no torch): `agent.cli` imports it to build the
parser for every command. The handlers import the heavy modules.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ARCH_CHOICES = ("mlp", "cnn1d")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="train a model in torch and export an ONNX bundle",
        description="Train a model in torch and export or verify an ONNX bundle.")
    sub = p.add_subparsers(dest="export_command", metavar="SUBCOMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train on an NPZ dataset and write a bundle directory",
                       description="Train on an NPZ dataset (see agent/dataset.py) and write a "
                                   "verified bundle directory atomically.")
    t.add_argument("--data", type=Path, required=True, metavar="D.npz", help="NPZ dataset")
    t.add_argument("--out", type=Path, required=True, metavar="BUNDLE/",
                   help="output bundle directory (must not exist or be empty, unless --force)")
    t.add_argument("--arch", choices=ARCH_CHOICES, default=None,
                   help="architecture (default: cnn1d for (N, C, T) data, mlp for (N, F))")
    t.add_argument("--epochs", type=int, default=None, help="maximum epochs (default 60)")
    t.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    t.add_argument("--name", default=None, help="bundle name (default: the --out dir's name)")
    t.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    t.add_argument("--quiet", action="store_true", help="no per-epoch progress on stderr")
    t.set_defaults(func=_train)

    v = sub.add_parser("verify", help="check a bundle: hashes, ONNX validity, torch/ONNX parity",
                       description="Verify a bundle; exits non-zero naming what failed.")
    v.add_argument("bundle", type=Path, metavar="BUNDLE/")
    v.add_argument("--data", type=Path, default=None, metavar="D.npz",
                   help="also check parity (and accuracy) on this dataset's windows")
    v.set_defaults(func=_verify)


def _train(args: argparse.Namespace) -> int:
    from agent.bundle import load_bundle
    from export.pipeline import train_bundle

    out = train_bundle(args.data, args.out, arch=args.arch, epochs=args.epochs, seed=args.seed,
                       threads=args.threads, name=args.name, force=args.force,
                       verbose=not args.quiet)
    m = load_bundle(out).manifest["training"]["metrics"]
    print(f"wrote {out}: test accuracy {m['test_accuracy']}, {m['epochs_run']} epochs "
          f"(best {m['best_epoch']}), {m['seconds']:.1f} s")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from export.verify import verify_bundle

    report = verify_bundle(args.bundle, args.data)
    print("\n".join(report.lines()))
    print("bundle OK")
    return 0
