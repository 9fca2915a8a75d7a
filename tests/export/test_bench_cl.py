"""`reverie bench cl`: metrics against hand-computed matrices and AUROC against
sklearn's, the split, the replay buffer's invariants, novelty measurement and the
novelty scores against brute-force oracles, the protocol end to end on tiny datasets
(every method, the MiniRocket baselines on (N, C, T) windows, several datasets and
seeds in one command), the markdown tables, the targets, and one-line errors."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from agent.cli import main
from agent.dataset import load_dataset, save_dataset
from agent.errors import ConfigError, DatasetError
from export.bench_cl import metrics
from export.bench_cl.baselines import ClassBalancedReservoir, NearestClassMean, StreamingLDA
from export.bench_cl.cli import register
from export.bench_cl.protocol import (
    METHODS,
    REFERENCES,
    Method,
    make_split,
    method_names,
    novelty_point,
    reference_names,
    run_method,
)

# R[i][j]: accuracy on task j after task i (3 tasks: base + 2).
R3 = [[0.9], [0.95, 0.8], [0.7, 0.9, 1.0]]


# ------------------------------------------------------------------ metrics

def test_metrics_on_a_hand_computed_matrix():
    R = metrics.accuracy_matrix(R3)
    assert np.isnan(R[0, 1]) and np.isnan(R[1, 2])
    assert metrics.average_accuracy(R) == pytest.approx((0.7 + 0.9 + 1.0) / 3)
    # BWT: ((0.7 - 0.9) + (0.9 - 0.8)) / 2
    assert metrics.backward_transfer(R) == pytest.approx(-0.05)
    # forgetting: task 0 max(0.9, 0.95) - 0.7 = 0.25; task 1 0.8 - 0.9 = -0.1
    assert metrics.task_forgetting(R, 0) == pytest.approx(0.25)
    assert metrics.task_forgetting(R, 1) == pytest.approx(-0.1)
    assert metrics.forgetting(R) == pytest.approx(0.075)
    assert metrics.curve(R) == pytest.approx([0.9, 0.875, 2.6 / 3])
    s = metrics.summary(R)
    assert s["base_acc"] == pytest.approx(0.7) and s["base_forgetting"] == pytest.approx(0.25)
    assert s["acc_matrix"][0] == [0.9, None, None]
    json.dumps(s, allow_nan=False)


def test_metrics_of_a_perfect_learner_and_of_total_forgetting():
    perfect = metrics.accuracy_matrix([[1.0], [1.0, 1.0], [1.0, 1.0, 1.0]])
    assert (metrics.average_accuracy(perfect), metrics.backward_transfer(perfect),
            metrics.forgetting(perfect)) == (1.0, 0.0, 0.0)
    # naive fine-tuning: only the last task is right
    naive = metrics.accuracy_matrix([[1.0], [0.0, 1.0], [0.0, 0.0, 1.0]])
    assert metrics.average_accuracy(naive) == pytest.approx(1 / 3)
    assert metrics.backward_transfer(naive) == pytest.approx(-1.0)
    assert metrics.forgetting(naive) == pytest.approx(1.0)


def test_metrics_with_a_single_task_and_bad_matrices():
    R = metrics.accuracy_matrix([[0.8]])
    assert metrics.backward_transfer(R) == 0.0 and metrics.forgetting(R) == 0.0
    with pytest.raises(ValueError, match="row 1"):
        metrics.accuracy_matrix([[1.0], [1.0]])
    with pytest.raises(ValueError, match="NaN"):
        metrics.average_accuracy(np.array([[1.0, np.nan], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        metrics.forgetting(np.ones((2, 3)))


def test_auroc_against_sklearn_on_random_scores_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(2, 60))
        pos = rng.random(n) < rng.uniform(0.1, 0.9)
        if pos.all() or not pos.any():
            pos[0] = not pos[0]
        scores = rng.standard_normal(n) + pos * rng.uniform(-1, 2)
        if trial % 2:                              # many ties
            scores = np.round(scores)
        assert metrics.auroc(scores, pos) == pytest.approx(roc_auc_score(pos, scores),
                                                           abs=1e-12), trial


def test_auroc_edge_cases():
    assert metrics.auroc([0.0, 1.0, 2.0], [False, True, True]) == 1.0
    assert metrics.auroc([2.0, 1.0, 0.0], [False, True, True]) == 0.0
    assert metrics.auroc([5.0] * 4, [True, False, True, False]) == 0.5
    assert metrics.auroc([0.0, np.inf], [False, True]) == 1.0     # empty memory: inf
    assert metrics.auroc([1.0, 2.0], [True, True]) is None
    assert metrics.auroc([], []) is None
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc([np.nan, 1.0], [True, False])
    with pytest.raises(ValueError, match="labels"):
        metrics.auroc([1.0, 2.0], [True])
    assert metrics.mean_or_none([None, 0.5, 1.0]) == 0.75
    assert metrics.mean_or_none([None]) is None


def test_docstring_examples():
    import doctest

    from export.bench_cl import cli

    for module in (metrics, cli):
        failed, tried = doctest.testmod(module)
        assert tried > 0 and failed == 0, module.__name__


# ------------------------------------------------------------------ split, buffer

def _dataset(tmp_path, n_classes=7, per_class=20, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    X = rng.standard_normal((len(y), 8)).astype(np.float32) + y[:, None]
    return load_dataset(save_dataset(tmp_path / "d.npz", X, y), seed=seed)


def test_split_in_dataset_order_with_each_stream_window_once(tmp_path):
    ds = _dataset(tmp_path)
    s = make_split(ds, 2, 2, seed=3)
    assert s.tasks == ((0, 1), (2, 3, 4), (5, 6))         # earlier groups get the extra
    assert s.n_tasks == 2 and s.names(2) == ["5", "6"]
    streamed = np.concatenate(s.stream)
    assert sorted(streamed.tolist()) == np.flatnonzero(ds.y >= 2).tolist()
    assert set(ds.y[s.stream[0]]) == {2, 3, 4}
    again = make_split(ds, 2, 2, seed=3)
    assert all((a == b).all() for a, b in zip(s.stream, again.stream, strict=True))
    assert make_split(ds, None, None, seed=0).tasks[0] == (0, 1, 2)   # default: half, 1/task
    assert make_split(ds, None, None, seed=0).n_tasks == 4


@pytest.mark.parametrize(("base", "tasks", "match"), [
    (1, None, "--base-classes 1"), (7, None, "--base-classes 7"), (3, 5, "--tasks 5"),
    (3, 0, "--tasks 0")])
def test_split_refuses_bad_class_counts(tmp_path, base, tasks, match):
    with pytest.raises(ConfigError, match=match):
        make_split(_dataset(tmp_path), base, tasks, seed=0)


def test_split_refuses_too_few_classes(tmp_path):
    with pytest.raises(DatasetError, match=">= 3"):
        make_split(_dataset(tmp_path, n_classes=2), None, None, seed=0)


def test_class_balanced_reservoir_invariants():
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.zeros(200, int), np.ones(7, int), np.full(150, 2),
                             rng.integers(0, 4, 300)])
    buf = ClassBalancedReservoir(40, labels, np.random.default_rng(1))
    for r in range(len(labels)):
        buf.add(r)
        assert len(buf) <= 40
        assert sorted(p for v in buf.by_class.values() for p in v) == list(range(len(buf)))
        for c, pos in buf.by_class.items():                   # positions hold their class
            assert all(labels[buf.items[p]] == c for p in pos)
    counts = np.bincount(labels[buf.items], minlength=4)
    assert counts.sum() == 40 and counts.max() - counts.min() <= 1   # balanced at the end
    assert len(set(buf.sample(10).tolist())) == 10


def test_method_names_and_the_no_sleep_fallback(monkeypatch):
    from export.bench_cl import protocol

    monkeypatch.setattr(protocol, "sleep_available", lambda: True)
    assert method_names(None) == list(METHODS)
    assert method_names(("slda", "reverie")) == ["reverie", "slda"]
    assert "minirocket_slda" in METHODS and "minirocket_ridge" not in METHODS
    assert method_names(("minirocket_ridge",)) == []          # a reference, not a method
    assert reference_names(None) == list(REFERENCES) == ["minirocket_ridge"]
    assert reference_names(("slda",)) == []
    with pytest.raises(ConfigError, match="unknown"):
        method_names(("reverie", "lwf"))
    monkeypatch.setattr(protocol, "sleep_available", lambda: False)
    assert "reverie_no_sleep" not in method_names(None) and "reverie" in method_names(None)


class Oracle(Method):
    """Knows every class it has been shown; with ``forgetful``, only the last one."""

    name, sleeps = "oracle", True

    def __init__(self, ds, split, forgetful=False):
        self.ds, self.forgetful = ds, forgetful
        self.known = set(split.tasks[0])
        self.last = None
        self.calls: list[str] = []

    def learn_one(self, row):
        self.calls.append("learn")
        self.last = int(self.ds.y[row])
        self.known = {self.last} if self.forgetful else self.known | {self.last}

    def predict(self, rows):
        self.calls.append("predict")
        y = self.ds.y_test[rows]
        return np.where(np.isin(y, list(self.known)), y, -1)

    def sleep(self):
        self.calls.append("sleep")
        return {"ok": True}


def test_run_method_against_oracles(tmp_path):
    ds = _dataset(tmp_path, n_classes=5)
    split = make_split(ds, 2, 3, seed=0)
    oracle = Oracle(ds, split)
    res = run_method(oracle, ds, split, (1, 5))
    assert res["acc"] == 1.0 and res["bwt"] == 0.0 and res["forgetting"] == 0.0
    assert res["few_shot"]["1"] == 1.0 and res["few_shot"]["others_acc"]["5"] == 1.0
    assert set(res["few_shot"]["per_class"]) == {"2", "3", "4"}
    assert len(res["sleeps"]) == 3
    # the stream of a task, its few-shot predictions, then (pre-sleep eval) sleep, eval
    first_sleep = oracle.calls.index("sleep")
    assert oracle.calls[:first_sleep].count("learn") == len(split.stream[0])
    assert oracle.calls[first_sleep - 1:first_sleep + 2] == ["predict", "sleep", "predict"]

    naive = run_method(Oracle(ds, split, forgetful=True), ds, split, (1,))
    R = np.array([[np.nan if v is None else v for v in r] for r in naive["acc_matrix"]])
    assert np.allclose(np.nan_to_num(R, nan=-1), [[1, -1, -1, -1], [0, 1, -1, -1],
                                                  [0, 0, 1, -1], [0, 0, 0, 1]])
    assert naive["acc"] == 0.25 and naive["forgetting"] == 1.0
    assert naive["few_shot"]["1"] == 1.0 and naive["few_shot"]["others_acc"]["1"] == 0.0


# ------------------------------------------------------------------ novelty

class ScoredOracle(Oracle):
    """An oracle whose novelty score is 1 on classes it has not learned, 0 on the others
    (``reverse``: the opposite); it flags only the even-numbered novel windows."""

    novelty_rule = "even novel rows"

    def __init__(self, ds, split, reverse=False):
        super().__init__(ds, split)
        self.reverse = reverse

    def novelty(self, rows):
        self.calls.append("novelty")
        novel = ~np.isin(self.ds.y_test[rows], list(self.known))
        flags = novel & (np.arange(len(rows)) % 2 == 0)
        return (~novel if self.reverse else novel).astype(float), flags


def test_novelty_is_measured_before_each_task_is_learned(tmp_path):
    ds = _dataset(tmp_path, n_classes=5)
    split = make_split(ds, 2, 3, seed=0)
    oracle = ScoredOracle(ds, split)
    res = run_method(oracle, ds, split, (1,))
    nov = res["novelty"]
    assert [p["task"] for p in nov["per_task"]] == [1, 2, 3]
    # measured after the previous task and before any window of the task: a perfect score
    assert nov["auroc"] == 1.0 and all(p["auroc"] == 1.0 for p in nov["per_task"])
    assert nov["false_alarm_rate"] == 0.0 and 0.3 < nov["flag_rate"] < 0.7
    assert nov["flags"] == "even novel rows"
    n_test = np.bincount(ds.y_test)
    assert [(p["n_novel"], p["n_known"]) for p in nov["per_task"]] == [
        (n_test[2], n_test[:2].sum()), (n_test[3], n_test[:3].sum()),
        (n_test[4], n_test[:4].sum())]
    first_learn = oracle.calls.index("learn")
    assert oracle.calls[first_learn - 1] == "novelty"
    reverse = run_method(ScoredOracle(ds, split, reverse=True), ds, split, (1,))
    assert reverse["novelty"]["auroc"] == 0.0
    assert run_method(Oracle(ds, split), ds, split, (1,))["novelty"] is None


def test_novelty_point_by_hand(tmp_path):
    ds = _dataset(tmp_path, n_classes=4, per_class=10)
    split = make_split(ds, 2, 2, seed=0)

    class Fixed(Method):
        def novelty(self, rows):            # score = the class index: novel scores highest
            return ds.y_test[rows].astype(float), ds.y_test[rows] >= 1

    p = novelty_point(Fixed(), ds, split, 1)
    assert p["auroc"] == 1.0 and p["flag_rate"] == 1.0
    assert p["false_alarm_rate"] == pytest.approx(0.5)        # class 1 of the known 0, 1


def _features(seed=0, n=60, d=5, k=4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    Z = rng.standard_normal((n, d)) + 2 * rng.standard_normal((k, d))[y]
    return Z, rng.standard_normal((25, d)) * 2, y


def test_ncm_and_slda_novelty_scores_against_brute_force():
    Z, Z_test, y = _features()
    base = np.flatnonzero(y < 2)
    rows = np.arange(len(Z_test))
    ncm = NearestClassMean(Z, Z_test, y, 4, base)
    slda = StreamingLDA(Z, Z_test, y, 4, base)
    for r in np.flatnonzero(y == 2)[:5]:
        ncm.learn_one(int(r))
        slda.learn_one(int(r))
    learned = np.concatenate([base, np.flatnonzero(y == 2)[:5]])
    means = np.stack([Z[learned][y[learned] == c].mean(0) for c in range(3)])
    euclid = np.array([[np.linalg.norm(z - m) for m in means] for z in Z_test])
    score, flags = ncm.novelty(rows)
    assert np.allclose(score, euclid.min(1))
    assert (flags == (score > ncm.threshold)).all()
    assert (ncm.predict(rows) == euclid.argmin(1)).all()

    P = np.linalg.inv((1 - 1e-4) * slda.S + 1e-4 * np.eye(Z.shape[1]))
    assert np.allclose(slda.mu[:3], means)
    maha = np.array([[np.sqrt((z - m) @ P @ (z - m)) for m in slda.mu[:3]] for z in Z_test])
    score, flags = slda.novelty(rows)
    assert flags is None and np.allclose(score, maha.min(1))
    assert (slda.predict(rows) == maha.argmin(1)).all()       # shared covariance: same rule


def test_ncm_threshold_flags_about_five_percent_of_its_base_windows():
    Z, _, y = _features(n=400)
    base = np.flatnonzero(y < 2)
    ncm = NearestClassMean(Z, Z[base], y, 4, base)
    _, flags = ncm.novelty(np.arange(len(base)))
    assert 0.02 <= flags.mean() <= 0.06


# ------------------------------------------------------------------ MiniRocket, recipe

def _series_dataset(path, n_classes=5, per_class=16, channels=2, length=48, seed=0):
    """(N, C, T) windows: a sine whose frequency is the class, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    t = np.arange(length)
    X = (np.sin(2 * np.pi * (y[:, None, None] + 1) * t / length + rng.uniform(0, 6, (len(y), 1, 1)))
         + 0.3 * rng.standard_normal((len(y), channels, length))).astype(np.float32)
    return save_dataset(path, X, y)


def test_minirocket_features_are_seeded_and_take_both_shapes():
    from export.bench_cl.minirocket import MINIROCKET_DIM, MiniRocketFeatures, as_series

    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 3, 30)).astype(np.float32)
    a = MiniRocketFeatures(seed=1).fit(X[:8])
    F = a.transform(X)
    assert F.shape == (12, MINIROCKET_DIM) and np.isfinite(F).all()
    assert np.array_equal(F, MiniRocketFeatures(seed=1).fit(X[:8]).transform(X))
    flat = rng.standard_normal((10, 20))                       # (N, F): 1-channel series
    assert as_series(flat).shape == (10, 1, 20)
    assert MiniRocketFeatures(seed=0, dim=16).fit(flat).transform(flat).shape == (10, 16)


def test_joint_upper_bound_uses_the_base_bundles_recipe():
    from export.bench_cl.baselines import base_recipe
    from export.bench_cl.protocol import CLConfig
    from export.model import ArchConfig
    from export.train import TrainConfig

    arch = ArchConfig.for_data((2, 48), 3, hidden=(32, 16))
    manifest = {"arch": arch.to_dict(),
                "training": {"config": {**TrainConfig(epochs=7, seed=4, lr=1e-3).to_dict(),
                                        "a_future_knob": 1}}}
    got_arch, tc = base_recipe(manifest, 9, CLConfig(seed=4))
    assert got_arch == ArchConfig.for_data((2, 48), 9, hidden=(32, 16))
    assert (tc.epochs, tc.seed, tc.lr) == (7, 4, 1e-3)
    _, tc = base_recipe({"arch": arch.to_dict()}, 9, CLConfig(seed=2, epochs=3))
    assert (tc.epochs, tc.seed) == (3, 2)


# ------------------------------------------------------------------ end to end

def _tiny_digits(path):
    """6 digit classes, 30 windows each (24 train / 6 test)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = np.concatenate([np.flatnonzero(d.target == c)[:30] for c in range(6)])
    return save_dataset(path, d.data[rows], d.target[rows])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_cl")
    data = _tiny_digits(tmp / "tiny.npz")
    out, png = tmp / "cl.json", tmp / "cl.png"
    argv = ["bench", "cl", "--data", str(data), "--base-classes", "3", "--tasks", "2",
            "--memory", "60", "--seed", "1", "--epochs", "4", "--sleep-budget", "2",
            "--json", str(out), "--plot", str(png), "--quiet"]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and len(doc["runs"]) == 1
    return data, doc["runs"][0], png


def test_protocol_end_to_end_writes_every_method_and_the_plot(tiny_run, capsys):
    _, res, png = tiny_run
    assert set(res) >= {"dataset", "protocol", "methods", "joint_upper_bound",
                        "joint_references", "targets"}
    expected = [m for m in METHODS if m != "reverie_no_sleep" or res["protocol"]["sleep_available"]]
    proto = res["protocol"]
    assert proto["methods"] == expected and set(res["methods"]) == set(expected)
    assert proto["base_classes"] == ["0", "1", "2"] and proto["tasks"] == [["3", "4"], ["5"]]
    assert proto["memory"] == 60 and proto["stream_windows"] == 3 * 24
    for name, m in res["methods"].items():
        for key in ("acc", "bwt", "forgetting", "acc_matrix", "base_acc", "few_shot",
                    "time_per_window_us", "time_per_sleep_s"):
            assert key in m, (name, key)
        R = m["acc_matrix"]
        assert len(R) == 3 and [len(r) for r in R] == [3, 3, 3]
        assert all(v is None for i, r in enumerate(R) for v in r[i + 1:])
        assert m["acc"] == pytest.approx(np.mean(R[-1]), abs=1e-5)
        assert 0 <= m["acc"] <= 1 and m["time_per_window_us"] > 0
        assert set(m["few_shot"]) == {"1", "5", "10", "others_acc", "per_class"}
        assert set(m["few_shot"]["others_acc"]) == {"1", "5", "10"}
        assert set(m["few_shot"]["per_class"]) == {"3", "4", "5"}
    rev = res["methods"]["reverie"]
    if proto["sleep_available"]:
        assert len(rev["sleeps"]) == 2 and rev["time_per_sleep_s"] > 0
        assert len(rev["acc_matrix_before_sleep"]) == 3
    assert res["methods"]["ncm"]["time_per_sleep_s"] is None
    assert res["methods"]["river_knn"]["window_size"] == 60
    assert 0 < res["joint_upper_bound"]["acc"] <= 1
    assert res["joint_upper_bound"]["arch"] == "mlp"       # the base bundle's, on (N, F)
    ridge = res["joint_references"]["minirocket_ridge"]
    assert 0 < ridge["acc"] <= 1 and len(ridge["per_task"]) == 3
    assert res["methods"]["minirocket_slda"]["projected_dim"] == 512
    for name in ("reverie", "ncm", "slda", "minirocket_slda"):
        nov = res["methods"][name]["novelty"]
        assert len(nov["per_task"]) == 2 and 0 <= nov["auroc"] <= 1, name
    assert res["methods"]["ncm"]["novelty"]["flag_rate"] is not None
    assert res["methods"]["slda"]["novelty"]["flag_rate"] is None
    assert res["methods"]["finetune"]["novelty"] is None
    assert {t["key"] for t in res["targets"]} >= {"acc_vs_baselines", "base_forgetting",
                                                  "joint_vs_minirocket_ridge", "novelty_auroc",
                                                  "novelty_flags"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reverie_reports_each_readout_with_fused_equal_to_its_acc(tiny_run):
    from agent.learner import Learner

    if not hasattr(Learner, "readout_probs"):
        pytest.skip("Learner.readout_probs is not in this build")
    rev = tiny_run[1]["methods"]["reverie"]
    assert {"head", "knn", "fused"} <= set(rev["readouts"])
    assert rev["readouts"]["fused"] == pytest.approx(rev["acc"], abs=1e-6)
    assert all(0 <= v <= 1 for v in rev["readouts"].values())


def test_same_seed_same_accuracies(tiny_run, tmp_path):
    data, first, _ = tiny_run
    out = tmp_path / "again.json"
    methods = "reverie,slda,replay,river_tree"
    assert main(["bench", "cl", "--data", str(data), "--base-classes", "3", "--tasks", "2",
                 "--memory", "60", "--seed", "1", "--epochs", "4", "--sleep-budget", "2",
                 "--methods", methods, "--json", str(out), "--quiet"]) == 0
    again = json.loads(out.read_text())["runs"][0]
    assert again["protocol"]["methods"] == methods.split(",")
    assert again["joint_references"] == {}
    for name, m in again["methods"].items():
        assert m["acc_matrix"] == first["methods"][name]["acc_matrix"], name
        assert m["few_shot"] == first["methods"][name]["few_shot"], name
    assert again["joint_upper_bound"]["acc"] == first["joint_upper_bound"]["acc"]


def test_the_plan_of_several_datasets_and_seeds(tmp_path):
    from export.bench_cl.cli import plan

    digits = _tiny_digits(tmp_path / "digits.npz")
    series = _series_dataset(tmp_path / "series.npz")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["cl", "--data", str(digits), "--data", str(series),
                              "--base-classes", "series.npz=2", "--tasks", "2,3",
                              "--memory", "40", "--seeds", "3,1", "--json", "x.json"])
    runs = plan(args)
    assert [(p.name, c.seed, c.base_classes, c.tasks, c.memory) for p, c in runs] == [
        ("digits.npz", 3, None, 2, 40), ("digits.npz", 1, None, 2, 40),
        ("series.npz", 3, 2, 3, 40), ("series.npz", 1, 2, 3, 40)]
    args = parser.parse_args(["cl", "--data", str(digits), "--seed", "5", "--json", "x.json"])
    assert [(c.seed, c.memory) for _, c in plan(args)] == [(5, 500)]
    args = parser.parse_args(["cl", "--data", str(digits), "--json", "x.json"])
    assert [c.seed for _, c in plan(args)] == [0]
    with pytest.raises(SystemExit):          # --seed and --seeds exclude each other
        parser.parse_args(["cl", "--data", "a", "--seed", "1", "--seeds", "1,2", "--json", "x"])


@pytest.mark.slow
def test_several_datasets_and_seeds_in_one_command(tmp_path, capsys):
    digits = _tiny_digits(tmp_path / "digits.npz")
    series = _series_dataset(tmp_path / "series.npz")
    out, md, png = tmp_path / "cl.json", tmp_path / "cl.md", tmp_path / "p" / "cl.png"
    methods = "reverie,ncm,slda,minirocket_slda,minirocket_ridge"
    assert main(["bench", "cl", "--data", str(digits), "--data", str(series),
                 "--base-classes", "series.npz=2", "--tasks", "2,3", "--memory", "40",
                 "--seeds", "0,1", "--epochs", "1", "--sleep-budget", "0.5",
                 "--methods", methods, "--json", str(out), "--markdown", str(md),
                 "--plot", str(png), "--quiet"]) == 0
    doc = json.loads(out.read_text())
    runs = doc["runs"]
    assert doc["complete"] and doc["environment"]["sktime"] == "1.2.0"
    assert [(r["dataset"]["name"], r["protocol"]["seed"]) for r in runs] == [
        ("digits.npz", 0), ("digits.npz", 1), ("series.npz", 0), ("series.npz", 1)]
    assert [len(r["protocol"]["base_classes"]) for r in runs] == [3, 3, 2, 2]  # default: half
    assert [r["protocol"]["n_tasks"] for r in runs] == [2, 2, 3, 3]
    for r in runs:
        assert r["protocol"]["methods"] == ["reverie", "ncm", "slda", "minirocket_slda"]
        assert set(r["methods"]) == set(r["protocol"]["methods"])
        assert set(r["joint_references"]) == {"minirocket_ridge"}
        assert r["protocol"]["memory"] == 40
    series_run = runs[2]
    assert series_run["dataset"]["input_shape"] == [2, 48]
    assert series_run["joint_upper_bound"]["arch"] == "cnn1d"
    assert 0 <= series_run["methods"]["minirocket_slda"]["acc"] <= 1
    text = md.read_text()
    assert text.count("\n### ") == 2 and "### digits.npz" in text and "### series.npz" in text
    assert "| ACC % s0 | ACC % s1 | ACC % mean |" in text
    assert "| minirocket_ridge (joint) |" in text and "| target | seed 0 | seed 1 |" in text
    from export.bench_cl import report

    capsys.readouterr()
    assert report.main([str(out)]) == 0                 # the same tables again from the JSON
    assert capsys.readouterr().out == text
    assert sorted(f.name for f in png.parent.iterdir()) == [
        "cl-digits-s0.png", "cl-digits-s1.png", "cl-series-s0.png", "cl-series-s1.png"]


def _run(name, seed, acc, **extra):
    """A minimal run result for the report and the targets."""
    methods = {m: {"acc": a, "base_forgetting": 0.01, "time_per_window_p50_us": 10.0,
                   "novelty": None} for m, a in acc.items()}
    methods["reverie"].update(extra)
    run = {"dataset": {"path": f"/d/{name}", "name": name, "classes": ["a", "b", "c"],
                       "input_shape": [1, 8], "n_train": 30, "n_test": 12},
           "protocol": {"seed": seed, "base_classes": ["a", "b"], "n_tasks": 1, "memory": 9,
                        "base_bundle": {"arch": "cnn1d", "latent_dim": 64}},
           "methods": methods, "joint_upper_bound": {"acc": 0.5},
           "joint_references": {"minirocket_ridge": {"acc": 0.52}}, "wall_time_s": 3.0}
    from export.bench_cl.cli import targets

    run["targets"] = targets(run)
    return run


def test_targets_count_ties_as_met():
    nov = {"auroc": 0.85, "flag_rate": 0.5, "false_alarm_rate": 0.1}
    run = _run("a.npz", 0, {"reverie": 0.9, "slda": 0.9, "ncm": 0.2},
               readouts={"head": 0.9, "knn": 0.3, "fused": 0.9}, novelty=nov)
    met = {t["key"]: t["met"] for t in run["targets"]}
    assert met == {"acc_vs_baselines": True, "acc_vs_readouts": True, "base_forgetting": True,
                   "joint_vs_minirocket_ridge": True, "gap_to_joint": None,
                   "novelty_auroc": True, "novelty_flags": True}
    worse = _run("a.npz", 0, {"reverie": 0.9, "minirocket_slda": 0.91},
                 readouts={"schema": 0.95, "fused": 0.9},
                 novelty={"auroc": 0.8, "flag_rate": 0.9, "false_alarm_rate": 0.11})
    met = {t["key"]: t["met"] for t in worse["targets"]}
    assert not (met["acc_vs_baselines"] or met["acc_vs_readouts"] or met["novelty_auroc"]
                or met["novelty_flags"])
    assert "minirocket_slda 91.0" in next(t["measured"] for t in worse["targets"]
                                          if t["key"] == "acc_vs_baselines")


def test_markdown_has_one_table_per_dataset_with_seeds_as_columns():
    from export.bench_cl.report import markdown

    runs = [_run("a.npz", s, {"reverie": 0.8 + s / 100, "slda": 0.7},
                 readouts={"head": 0.6, "fused": 0.8}) for s in (0, 1, 2)]
    runs.append(_run("b.npz", 0, {"reverie": 0.5, "slda": 0.6}))
    text = markdown(runs, command="reverie bench cl ...")
    sections = text.split("\n### ")[1:]
    assert [s.splitlines()[0] for s in sections] == ["a.npz", "b.npz"]
    a = sections[0]
    header = next(ln for ln in a.splitlines() if ln.startswith("| method"))
    assert header == ("| method | ACC % s0 | ACC % s1 | ACC % s2 | ACC % mean | base forget pts s0 "
                      "| base forget pts s1 | base forget pts s2 | novelty AUROC | flag % "
                      "| false alarm % | us/window p50 |")
    assert "| reverie | 80.0 | 81.0 | 82.0 | 81.0 | 1.0 | 1.0 | 1.0 | - | - | - | 10 |" in a
    assert "| reverie: head readout | 60.0 | 60.0 | 60.0 | 60.0 |" in a
    assert "| joint upper bound (cnn1d, bundle recipe) | 50.0 | 50.0 | 50.0 | 50.0 |" in a
    assert "| minirocket_ridge (joint) | 52.0 | 52.0 | 52.0 | 52.0 |" in a
    assert "| target | seed 0 | seed 1 | seed 2 |" in a
    assert "| reverie ACC >= every in-run baseline | met: 80.0 vs slda 70.0 |" in a
    assert "**NOT met**: 50.0 vs slda 60.0" in sections[1]


@pytest.mark.parametrize(("text", "match"), [
    ("x.npz=3", "'x.npz' matches no --data file"), ("3,4,5", "3 values for 2 datasets"),
    ("a.npz=3,4", "expected K"), ("a.npz=three", "not an integer")])
def test_per_dataset_option_errors(text, match):
    from pathlib import Path

    from export.bench_cl.cli import per_dataset

    with pytest.raises(ConfigError, match=match):
        per_dataset(text, "--base-classes", [Path("a.npz"), Path("d/b.npz")])
    assert per_dataset("d/b.npz=4", "--tasks", [Path("a.npz"), Path("d/b.npz")]) == [None, 4]


def _one_line_error(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("reverie bench: error:")]
    assert rc == 2 and "Traceback" not in err
    assert len(lines) == 1 and match in lines[0], err


def test_data_in_the_wrong_format_is_a_one_line_error(capsys, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip\n")
    out = tmp_path / "o.json"
    _one_line_error(capsys, ["bench", "cl", "--data", str(bad), "--json", str(out)],
                    "bad.npz: not a readable .npz")
    (tmp_path / "zero.npz").write_bytes(b"")
    _one_line_error(capsys, ["bench", "cl", "--data", str(tmp_path / "zero.npz"),
                             "--json", str(out)], "not a readable .npz")
    np.savez(tmp_path / "nolabels.npz", X=np.zeros((10, 4), np.float32))
    _one_line_error(capsys, ["bench", "cl", "--data", str(tmp_path / "nolabels.npz"),
                             "--json", str(out)], "missing key 'y'")
    assert not out.exists()


def test_bad_arguments_are_one_line_errors_before_training(capsys, tmp_path):
    data = _tiny_digits(tmp_path / "t.npz")
    out = str(tmp_path / "o.json")
    _one_line_error(capsys, ["bench", "cl", "--data", str(data), "--base-classes", "3",
                             "--tasks", "4", "--json", out], "--tasks 4")
    _one_line_error(capsys, ["bench", "cl", "--data", str(data), "--methods", "reverie,ewc",
                             "--json", out], "unknown ['ewc']")
    _one_line_error(capsys, ["bench", "cl", "--data", str(data), "--memory", "0",
                             "--json", out], "--memory 0")
    _one_line_error(capsys, ["bench", "cl", "--data", str(data), "--reverie", "capacty=3",
                             "--json", out], "unknown field 'capacty'")
    _one_line_error(capsys, ["bench", "cl", "--data", str(data), "--data", str(data),
                             "--base-classes", "t.npz=3", "--json", out], "matches several")
    _one_line_error(capsys, ["bench", "cl", "--data", str(data), "--seeds", "0,x",
                             "--json", out], "--seeds")


def test_learner_config_overrides():
    from agent.learner import LearnerConfig
    from export.bench_cl.protocol import learner_config

    cfg = learner_config(LearnerConfig(capacity=50), ("surprise_threshold=0", "sleep.rank=8",
                                                     "center=false", "readout=vote"))
    assert (cfg.capacity, cfg.surprise_threshold, cfg.sleep.rank, cfg.center, cfg.readout) \
        == (50, 0.0, 8, False, "vote")
    for bad, match in (("rank", "key=value"), ("sleep.rank=x", "of type int"),
                       ("memory.x=1", "nested"), ("sparse=1", "cannot be set"),
                       ("k_neighbors=0", "k_neighbors")):
        with pytest.raises(ConfigError, match=match):
            learner_config(LearnerConfig(), (bad,))


def test_importing_the_cli_stays_cheap():
    code = ("import sys, export.bench_cl.cli; "
            "print('torch' in sys.modules, 'river' in sys.modules, 'sktime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False False False"
