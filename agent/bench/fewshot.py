"""``reverie bench fewshot``: learn a new class from n labelled windows, no sleep.

Protocol (issue 4): for each class the bundle was not trained on, a fresh Learner (the
bundle, its exemplars) learns ``n`` labelled windows of that class drawn from the training
split (seeded), then is evaluated on the test split: the new class's recall, and the
accuracy on the base classes against the same learner before it learned anything. Repeated
for every held-out class and ``--trials`` draws; mean and worst are reported for each n.
A second protocol, ``sequential``, learns every held-out class one after another (n each)
and reports the final recall of each and the base-class accuracy at the end.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from agent.bench.cli import environment, print_table, write_json


def register(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "fewshot", help="new-class recall after n labelled windows",
        description="For each class of the dataset that the bundle was not trained on, a "
        "fresh learner learns n labelled windows of it (no sleep); reports the new class's "
        "recall and the base classes' accuracy drop. Train the bundle on some classes only "
        "(`reverie export train --base-classes K`) so that there is something to learn.")
    p.add_argument("--bundle", required=True, metavar="BUNDLE/",
                   help="a bundle trained on some of the dataset's classes")
    p.add_argument("--data", required=True, metavar="D.npz",
                   help="the NPZ dataset the bundle was trained from, with classes it was not")
    p.add_argument("--shots", type=_positive_int, nargs="+", default=[1, 5, 10], metavar="N",
                   help="labelled windows per new class (default: 1 5 10)")
    p.add_argument("--trials", type=_positive_int, default=3, metavar="N",
                   help="random draws of the windows per shot count (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--json", default=None, metavar="OUT.json",
                   help="also write the results here (default: table only)")
    p.set_defaults(func=cmd_fewshot)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value: {text!r} (expected an integer >= 1)")
    return value


def _accuracy(learner, Z, names) -> float:
    """Accuracy on latents `Z` (the test windows encoded once: the encoder is frozen)."""
    if not len(Z):
        return float("nan")
    preds = learner.predict_latents(Z)
    return float(np.mean([p.label == n for p, n in zip(preds, names, strict=True)]))


def run(bundle_path: str, data: str, shots: list[int], trials: int, seed: int,
        config=None) -> dict:
    from agent.bundle import load_bundle
    from agent.dataset import load_dataset
    from agent.errors import ConfigError
    from agent.inference import Encoder
    from agent.learner import Learner, LearnerConfig

    config = config or LearnerConfig()
    bundle = load_bundle(bundle_path)
    ds = load_dataset(data, seed=seed, input_shape=bundle.input.shape)
    train_names = np.array([ds.classes[i] for i in ds.y])
    test_names = np.array([ds.classes[i] for i in ds.y_test])
    base = list(bundle.classes)
    new = [c for c in ds.classes if c not in base]
    if not new:
        raise ConfigError(f"{data}: every class ({', '.join(ds.classes)}) is a base class of "
                          f"bundle {bundle_path}; nothing to learn: train it on some classes "
                          "only, e.g. `reverie export train --base-classes K`")
    base_mask = np.isin(test_names, base)
    # One onnxruntime session for every learner, and the test windows encoded once.
    encoder = Encoder(bundle, threads=config.threads)
    Z_test = encoder.encode(ds.X_test.astype(np.float32))

    def fresh() -> Learner:
        return Learner(bundle, config, encoder=encoder)

    results = {"independent": {}, "sequential": {}}
    learn_times = []
    # A fresh learner is deterministic (seeded, one onnxruntime thread): its base-class
    # accuracy is the same for every trial, so measure it once.
    before = _accuracy(fresh(), Z_test[base_mask], test_names[base_mask])
    for n in shots:
        recalls, worst_by_class, drops = [], {}, []
        for t in range(trials):
            rng = np.random.default_rng(seed * 1000 + t)
            for c in new:
                L = fresh()
                idx = rng.permutation(np.flatnonzero(train_names == c))[:n]
                for i in idx:
                    t0 = time.perf_counter()
                    L.learn_one(ds.X[i], c)
                    learn_times.append(time.perf_counter() - t0)
                mask = test_names == c
                r = _accuracy(L, Z_test[mask], test_names[mask])
                after = _accuracy(L, Z_test[base_mask], test_names[base_mask])
                recalls.append(r)
                worst_by_class[c] = min(worst_by_class.get(c, 1.0), r)
                drops.append(100 * (before - after))
        results["independent"][n] = {
            "new_recall_mean": float(np.mean(recalls)), "new_recall_worst": float(np.min(recalls)),
            "per_class_mean": {c: float(np.mean(recalls[i::len(new)])) for i, c in enumerate(new)},
            "base_acc_drop_points_mean": float(np.mean(drops)),
            "base_acc_drop_points_worst": float(np.max(drops))}
        # sequential: all new classes, one after another
        rng = np.random.default_rng(seed)
        L = fresh()
        for c in new:
            for i in rng.permutation(np.flatnonzero(train_names == c))[:n]:
                L.learn_one(ds.X[i], c)
        per = {c: _accuracy(L, Z_test[test_names == c], test_names[test_names == c])
               for c in new}
        results["sequential"][n] = {
            "new_recall_mean": float(np.mean(list(per.values()))), "per_class": per,
            "base_acc_before": before,
            "base_acc_after": _accuracy(L, Z_test[base_mask], test_names[base_mask]),
            "all_classes_acc": _accuracy(L, Z_test, test_names)}
    results["learn_one_p50_us"] = float(np.median(learn_times) * 1e6) if learn_times else None
    results["bundle"] = bundle.bundle_id
    results["base_classes"], results["new_classes"] = base, new
    return results


def cmd_fewshot(args: argparse.Namespace) -> int:
    res = run(args.bundle, args.data, args.shots, args.trials, args.seed)
    rows = []
    for n in args.shots:
        ind, seq = res["independent"][n], res["sequential"][n]
        rows.append({"shots": n, "new_recall_mean": ind["new_recall_mean"],
                     "new_recall_worst": ind["new_recall_worst"],
                     "base_drop_pts_mean": ind["base_acc_drop_points_mean"],
                     "base_drop_pts_worst": ind["base_acc_drop_points_worst"],
                     "seq_new_recall": seq["new_recall_mean"],
                     "seq_base_acc": seq["base_acc_after"], "seq_all_acc": seq["all_classes_acc"]})
    print_table(rows, list(rows[0]), title=f"few-shot, base {res['base_classes']}, "
                f"new {res['new_classes']} (independent: one new class at a time)")
    write_json(args.json, {"bench": "fewshot", "environment": environment(), **res})
    return 0
