"""`reverie bench cl`: metrics against hand-computed matrices, the split, the replay
buffer's invariants, the protocol end to end on a tiny dataset, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from agent.cli import main
from agent.dataset import load_dataset, save_dataset
from agent.errors import ConfigError, DatasetError
from export.bench_cl import metrics
from export.bench_cl.baselines import ClassBalancedReservoir
from export.bench_cl.protocol import METHODS, Method, make_split, method_names, run_method

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
    assert len(res["sleeps"]) == 3 and res["time_per_sleep_s"] >= 0
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
    return data, json.loads(out.read_text()), png


def test_protocol_end_to_end_writes_every_method_and_the_plot(tiny_run, capsys):
    _, res, png = tiny_run
    assert set(res) >= {"dataset", "protocol", "methods", "joint_upper_bound", "targets"}
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
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_accuracies(tiny_run, tmp_path):
    data, first, _ = tiny_run
    out = tmp_path / "again.json"
    methods = "reverie,slda,replay,river_tree"
    assert main(["bench", "cl", "--data", str(data), "--base-classes", "3", "--tasks", "2",
                 "--memory", "60", "--seed", "1", "--epochs", "4", "--sleep-budget", "2",
                 "--methods", methods, "--json", str(out), "--quiet"]) == 0
    again = json.loads(out.read_text())
    assert again["protocol"]["methods"] == methods.split(",")
    for name, m in again["methods"].items():
        assert m["acc_matrix"] == first["methods"][name]["acc_matrix"], name
        assert m["few_shot"] == first["methods"][name]["few_shot"], name
    assert again["joint_upper_bound"]["acc"] == first["joint_upper_bound"]["acc"]


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
            "print('torch' in sys.modules, 'river' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False False"
