"""``reverie export train|verify|quantize|probe|keygen|sign``: registered through the ``reverie.commands`` entry point.

Importing this module must stay cheap (no torch): `agent.cli` imports it to build the
parser for every command. The handlers import the heavy modules.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.errors import ConfigError

ARCH_CHOICES = ("mlp", "cnn1d", "minirocket")  # export.model.ARCHS (no torch import here)
REDUCE_CHOICES = ("pca", "random", "none")


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
                   help="architecture (default: ArchConfig.for_data: minirocket for (N, C, T) "
                        "windows, mlp for (N, F) features)")
    t.add_argument("--features", type=int, default=None, metavar="F",
                   help="minirocket: MiniRocket features, a multiple of 84 (default 840)")
    t.add_argument("--reduce", choices=REDUCE_CHOICES, default=None,
                   help="minirocket: how the standardized features become the latent: pca "
                        "(fitted on the training features), random (seeded projection) or "
                        "none (the latent is all F features) (default pca)")
    t.add_argument("--latent-dim", type=int, default=None, metavar="L",
                   help="minirocket: latent size after pca/random (default 256)")
    t.add_argument("--augment", action="store_true",
                   help="augment (C, T) windows: per-channel amplitude scaling, jitter, time "
                        "shift (seeded); a frozen transform (minirocket) gets "
                        "--augment-copies augmented copies of every training window")
    t.add_argument("--augment-copies", type=int, default=None, metavar="N",
                   help="with --augment, copies per training window for minirocket (default 4)")
    t.add_argument("--epochs", type=int, default=None, help="maximum epochs (default 60)")
    t.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    t.add_argument("--name", default=None, help="bundle name (default: the --out dir's name)")
    t.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    t.add_argument("--quiet", action="store_true", help="no per-epoch progress on stderr")
    subset = t.add_mutually_exclusive_group()
    subset.add_argument("--classes", default=None, metavar="A,B,..",
                        help="train on these classes only (logit order as given); the others "
                             "are recorded as held out for the device to learn")
    subset.add_argument("--base-classes", type=int, default=None, metavar="K",
                        help="train on the first K classes in the dataset's order")
    t.add_argument("--split", default=None, metavar="early|late|N",
                   help="where the encoder ends: 'early', 'late' or the number of hidden "
                        "layers in the encoder (default: early, chosen by `export probe`)")
    t.add_argument("--sae", action="store_true",
                   help="also train a top-k sparse autoencoder on the latents (sae.npz)")
    t.add_argument("--sae-units", type=int, default=None, metavar="M",
                   help="sparse autoencoder units (default 1024)")
    t.add_argument("--sae-active", type=float, default=None, metavar="F",
                   help="fraction of units active per code (default 0.02)")
    t.set_defaults(func=_train)

    v = sub.add_parser("verify", help="check a bundle: hashes, ONNX validity, torch/ONNX parity",
                       description="Verify a bundle; exits non-zero naming what failed. An "
                                   "int8 bundle (export quantize) keeps the 1e-4 bound between "
                                   "encoder + head and model.onnx but is compared with torch by "
                                   "argmax agreement; the output lists every check run.")
    v.add_argument("bundle", type=Path, metavar="BUNDLE/")
    v.add_argument("--data", type=Path, default=None, metavar="D.npz",
                   help="also check parity (and accuracy) on this dataset's windows")
    v.add_argument("--public-key", type=Path, action="append", default=None, metavar="PATH",
                   help="also require a valid signature by this key (repeatable)")
    v.set_defaults(func=_verify)

    q = sub.add_parser(
        "quantize", help="write an int8 copy of a bundle, refused if it loses too much accuracy",
        description="Quantize the bundle's encoder to int8 (static QDQ with per-channel weights "
                    "calibrated on D.npz; dynamic int8 too when the encoder has MatMul/Gemm), "
                    "score each end to end (int8 encoder + numpy head) on the test split of "
                    "the bundle's classes, time it per window (1 thread, batch 1) against "
                    "fp32, and write the fastest one within --max-drop as a new bundle.")
    q.add_argument("bundle", type=Path, metavar="BUNDLE/", help="the fp32 source bundle")
    q.add_argument("--calibration", type=Path, required=True, metavar="D.npz",
                   help="NPZ dataset: its train windows calibrate, its test windows score")
    q.add_argument("--out", type=Path, default=None, metavar="OUT/",
                   help="output bundle directory (default: BUNDLE-int8)")
    q.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                   help="refuse when accuracy drops by more than this many points (default 1.0)")
    q.add_argument("--force", action="store_true",
                   help="write the most accurate int8 encoder even if it exceeds --max-drop")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing bundle at the output directory")
    q.add_argument("--iterations", type=int, default=1000, metavar="N",
                   help="timed windows per encoder for the latency comparison (default 1000)")
    q.set_defaults(func=_quantize)

    from export.sign import register_keygen, register_sign

    register_keygen(sub)
    register_sign(sub)

    pr = sub.add_parser(
        "probe", help="measure where to split: linear probes of each latent on unseen classes",
        description="Train a base model on the first K classes, then fit a linear probe on "
                    "the latents of every candidate split point over all classes and print "
                    "its test accuracy on all, base and novel classes.")
    pr.add_argument("--data", type=Path, required=True, metavar="D.npz", help="NPZ dataset")
    pr.add_argument("--base-classes", type=int, required=True, metavar="K",
                    help="the base model learns the first K classes; the rest are novel")
    pr.add_argument("--arch", choices=ARCH_CHOICES, default=None,
                    help="architecture (default: from the data's shape)")
    pr.add_argument("--seeds", default="0", metavar="S,S,..",
                    help="training seeds; the table gives mean and std (default 0)")
    pr.add_argument("--epochs", type=int, default=None, help="maximum epochs (default 60)")
    pr.add_argument("--json", type=Path, default=None, metavar="OUT",
                    help="also write the full result as JSON")
    pr.set_defaults(func=_probe)


def _train(args: argparse.Namespace) -> int:
    from agent.bundle import load_bundle
    from export.classes import parse_class_list
    from export.pipeline import train_bundle
    from export.sae import SAEConfig

    classes = parse_class_list(args.classes) if args.classes is not None else None
    sae: bool | SAEConfig = args.sae
    if args.sae_units is not None or args.sae_active is not None:
        if not args.sae:
            raise ConfigError("--sae-units/--sae-active need --sae")
        defaults = SAEConfig()
        sae = SAEConfig(n_units=args.sae_units or defaults.n_units,
                        active_fraction=args.sae_active or defaults.active_fraction,
                        seed=args.seed or 0, threads=args.threads or 1)
    from export.train import TrainConfig

    arch_options = {k: v for k, v in (("n_features", args.features), ("reduce", args.reduce),
                                      ("reduce_dim", args.latent_dim)) if v is not None}
    tc: dict = {"augment": args.augment}
    if args.augment_copies is not None:
        tc["augment_copies"] = args.augment_copies
    out = train_bundle(args.data, args.out, arch=args.arch, epochs=args.epochs, seed=args.seed,
                       threads=args.threads, name=args.name, force=args.force,
                       classes=classes, base_classes=args.base_classes, split=args.split,
                       sae=sae, verbose=not args.quiet, train_config=TrainConfig(**tc),
                       arch_options=arch_options)
    manifest = load_bundle(out).manifest
    m = manifest["training"]["metrics"]
    print(f"wrote {out}: test accuracy {m['test_accuracy']}, {m['epochs_run']} epochs "
          f"(best {m['best_epoch']}), {m['seconds']:.1f} s")
    print(f"  classes {manifest['classes']}"
          + (f", held out {manifest['held_out_classes']}" if manifest["held_out_classes"] else ""))
    print(f"  latent {manifest['latent_dim']} ({manifest['split']['point']}), "
          f"head {manifest['head']['dims']}")
    if "sae" in manifest:
        s = manifest["sae"]
        print(f"  sae {s['config']['n_units']} units, k={s['config']['k']}: relative MSE "
              f"{s['relative_mse_test']} on test latents, {s['active_fraction']:.2%} active")
    return 0


def _probe(args: argparse.Namespace) -> int:
    import json

    from export.probe import format_table, probe_splits

    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    result = probe_splits(args.data, args.base_classes, arch=args.arch, seeds=seeds,
                          epochs=args.epochs, verbose=True)
    print(f"{result['data']}: base model on {result['base_classes']} of "
          f"{result['n_classes']} classes (novel: {', '.join(result['held_out_classes'])}); "
          f"seeds {seeds}; base test accuracy {result['base_model_test_accuracy']['mean']}")
    print(format_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from export.quantize import quantize_bundle

    report = quantize_bundle(args.bundle, args.calibration, args.out, max_drop=args.max_drop,
                             force=args.force, overwrite=args.overwrite,
                             iterations=args.iterations)
    print("\n".join(report.lines()))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from export.verify import verify_bundle

    report = verify_bundle(args.bundle, args.data, public_keys=args.public_key)
    print("\n".join(report.lines()))
    if report.signed_by:
        print(f"signature OK (key {report.signed_by})")
    print("bundle OK")
    return 0
