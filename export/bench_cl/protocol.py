"""The class-incremental protocol behind ``reverie bench cl``.

1. Load the NPZ dataset (its test split, or the seeded stratified one) and split its
   classes in dataset order: the first K are the base (task 0); the others, in dataset
   order, form T tasks of near-equal size (`make_split`).
2. Train the base bundle on the base classes (`export.train_bundle`, seeded) into a
   temporary directory; encode every window once with its ``encoder.onnx`` for the
   latent baselines (`export.bench_cl.cli.run` does 2 and 4 and assembles the result).
3. For every method: evaluate on the base classes' test windows (row 0 of R), then for
   each task stream its training windows once, in a seeded order, each with its label
   (`Method.learn_one`, timed); 1/5/10-shot accuracy is taken on a new class's test
   windows right after its 1st/5th/10th labelled window, before any sleep; after the
   task's stream a method that sleeps (reverie) sleeps, timed; then it is evaluated on
   the test windows of every class seen so far, giving row i of R (`run_method`).
   Novelty: at the start of each task i >= 1, before any of its windows is learned, a
   method with a novelty score (`Method.novelty`) scores the test windows of task i's
   classes (novel) and of every class seen so far (known): AUROC, the fraction of novel
   windows flagged and the false-alarm rate on known ones (`novelty_point`).
   After the last task, a method with several readouts (reverie) reports each one's
   accuracy on the same rows (`Method.readout_predictions`).
4. The joint references, trained offline on all classes: the base bundle's recipe
   (architecture and training config) and MiniRocket + ridge.

Every method predicts among all the classes it has seen (class-incremental: no task id
at test time). Everything is seeded by ``seed``; only wall times vary between runs (and
a sleep that hits its time budget before its sample count).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.dataset import Dataset
from agent.errors import ConfigError, DatasetError
from export.bench_cl import metrics

DEFAULT_SHOTS = (1, 5, 10)


@dataclass(frozen=True)
class CLConfig:
    """Protocol knobs. ``base_classes`` defaults to half the classes (rounded down, at
    least 2), ``tasks`` to one class per task; ``memory`` is the budget of stored
    episodes/exemplars every method gets; ``epochs`` caps base and joint training
    (default: `export.train.TrainConfig`'s, with early stopping)."""

    base_classes: int | None = None
    tasks: int | None = None
    memory: int = 500
    seed: int = 0
    shots: tuple[int, ...] = DEFAULT_SHOTS
    sleep_budget_s: float = 30.0
    epochs: int | None = None
    methods: tuple[str, ...] | None = None     # None: every method
    # LearnerConfig overrides for reverie ("key=value"; "sleep.key=value" for SleepConfig);
    # none by default: the benchmark measures the learner a user gets.
    reverie_overrides: tuple[str, ...] = ()
    # river's kNN compares a window against its whole window of stored samples in Python
    # space: its window is min(memory, river_max_cells // n_features) (the latter binds
    # only for memory > 520 on 768-dim windows).
    river_max_cells: int = 400_000

    def __post_init__(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ConfigError(what)

        need(isinstance(self.memory, int) and self.memory >= 1,
             f"--memory {self.memory}: expected an integer >= 1")
        need(isinstance(self.seed, int) and self.seed >= 0,
             f"--seed {self.seed}: expected an integer >= 0")
        need(len(self.shots) > 0 and all(isinstance(n, int) and n >= 1 for n in self.shots),
             f"--shots {self.shots}: expected positive integers")
        need(self.sleep_budget_s > 0, f"--sleep-budget {self.sleep_budget_s}: expected > 0 s")
        need(self.epochs is None or self.epochs >= 1, f"--epochs {self.epochs}: expected >= 1")
        need(self.river_max_cells >= 1, f"river_max_cells={self.river_max_cells}: expected >= 1")


@dataclass(frozen=True)
class Split:
    """Classes per task (indices into ``classes``; task 0 = base) and the stream."""

    classes: tuple[str, ...]
    tasks: tuple[tuple[int, ...], ...]
    stream: tuple[np.ndarray, ...]        # per task 1..T: train rows in arrival order
    task_of_class: np.ndarray             # (K,) int64

    @property
    def n_tasks(self) -> int:
        """T: the number of tasks after the base."""
        return len(self.tasks) - 1

    def names(self, task: int) -> list[str]:
        return [self.classes[c] for c in self.tasks[task]]


def make_split(ds: Dataset, base_classes: int | None, tasks: int | None, seed: int) -> Split:
    """Base = the first ``base_classes`` classes; the rest in dataset order, cut into
    ``tasks`` groups of near-equal size (earlier groups get the extra class). Within a
    task the training windows arrive in a seeded random order."""
    n = len(ds.classes)
    if n < 3:
        raise DatasetError(f"the dataset has {n} classes; the protocol needs >= 3 (>= 2 base "
                           "classes and >= 1 to learn)")
    K = max(2, n // 2) if base_classes is None else base_classes
    if isinstance(K, bool) or not isinstance(K, int) or not 2 <= K <= n - 1:
        raise ConfigError(f"--base-classes {K}: expected an integer in [2, {n - 1}] "
                          f"(the dataset has {n} classes)")
    T = n - K if tasks is None else tasks
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= n - K:
        raise ConfigError(f"--tasks {T}: expected an integer in [1, {n - K}] ({n - K} classes "
                          f"after {K} base classes)")
    for split_name, y in (("train", ds.y), ("test", ds.y_test)):
        counts = np.bincount(y, minlength=n)
        if (counts == 0).any():
            missing = [ds.classes[c] for c in np.flatnonzero(counts == 0)[:5]]
            raise DatasetError(f"class(es) {missing} have no {split_name} windows; every class "
                               "needs both")
    groups = [tuple(range(K))] + [tuple(int(c) for c in g)
                                  for g in np.array_split(np.arange(K, n), T)]
    task_of_class = np.zeros(n, dtype=np.int64)
    for t, g in enumerate(groups):
        task_of_class[list(g)] = t
    rng = np.random.default_rng(seed)
    stream = tuple(rng.permutation(np.flatnonzero(np.isin(ds.y, g))) for g in groups[1:])
    return Split(tuple(ds.classes), tuple(groups), stream, task_of_class)


@dataclass
class StreamData:
    """What methods are built from: the dataset, the base bundle and its latents."""

    ds: Dataset
    split: Split
    bundle_path: Path
    Z: np.ndarray          # (N, d) latents of ds.X from the base bundle's encoder.onnx
    Z_test: np.ndarray     # (N_test, d)
    config: CLConfig


class Method:
    """One learner under the protocol: rows index ``ds.X`` / ``ds.X_test``; predictions
    are class indices into ``ds.classes`` (-1: no prediction). ``stored`` says what it
    keeps, against the memory budget."""

    name = ""
    description = ""
    stored = ""
    sleeps = False

    def learn_one(self, row: int) -> None:
        raise NotImplementedError

    def predict(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def sleep(self) -> dict | None:
        """Consolidate between tasks (only methods with ``sleeps``); a JSON-ready report."""
        return None

    def info(self) -> dict:
        """Extra JSON fields (memory used, settings)."""
        return {}

    # How `novelty` flags a window (for the JSON); "" for methods without a novelty score.
    novelty_rule = ""

    def novelty(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Novelty of the test windows ``rows``: (scores (B,), higher = more novel; flags
        (B,) bool or None when the method has no decision rule). None: no novelty score."""
        return None

    def readout_predictions(self, rows: np.ndarray) -> dict[str, np.ndarray] | None:
        """Per readout, predictions (class indices, -1: none) on the test windows
        ``rows``; None for a method with a single readout."""
        return None


class ReverieMethod(Method):
    """`agent.learner.Learner` on the base bundle, memory capacity = the budget (its
    seeded bundle exemplars count against it); with ``sleep``, `Learner.sleep` after
    every task's stream."""

    def __init__(self, data: StreamData, *, sleep: bool):
        from agent.learner import Learner, LearnerConfig

        cfg = data.config
        self.config = learner_config(LearnerConfig(capacity=cfg.memory, seed=cfg.seed),
                                     cfg.reverie_overrides)
        self.learner = Learner.from_bundle(data.bundle_path, self.config)
        self.data = data
        self.sleeps = sleep and sleep_available()
        self.name = "reverie" if sleep else "reverie_no_sleep"
        self.description = ("reverie Learner: frozen encoder + head fused with the episodic "
                            "memory" + (", Learner.sleep after each task" if self.sleeps
                                        else ", no sleep (fast system only)"))
        self.stored = (f"episodic memory, capacity {cfg.memory} latents (seeded with "
                       f"{len(self.learner.memory)} bundle exemplars)")
        self._index = {c: i for i, c in enumerate(data.ds.classes)}
        self._ts = 0.0

    def learn_one(self, row: int) -> None:
        ds = self.data.ds
        self._ts += 1.0            # a logical clock: wall time would break determinism
        self.learner.learn_one(ds.X[row], ds.classes[ds.y[row]], ts=self._ts)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        preds = self.learner.predict_many(self.data.ds.X_test[rows])
        return np.array([self._index.get(p.label, -1) for p in preds], dtype=np.int64)

    novelty_rule = ("the learner's own flag (Prediction.novelty) on its score "
                    "(Prediction.novelty_score), from predict_many")

    def novelty(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        preds = self.learner.predict_many(self.data.ds.X_test[rows])
        return (np.array([p.novelty_score for p in preds], dtype=np.float64),
                np.array([p.novelty for p in preds], dtype=bool))

    def readout_predictions(self, rows: np.ndarray) -> dict[str, np.ndarray] | None:
        if not hasattr(self.learner, "readout_probs"):
            return None
        probs = self.learner.readout_probs(self.data.ds.X_test[rows])      # name -> (B, K')
        to_ds = np.array([self._index.get(c, -1) for c in self.learner.classes], dtype=np.int64)
        out = {}
        for name, p in probs.items():
            pred = to_ds[p.argmax(axis=1)] if p.shape[1] else np.full(len(p), -1)
            # a row of zeros (the readout knows nothing, or abstains) is no prediction
            pred[p.max(axis=1, initial=0.0) <= 0] = -1
            out[name] = pred
        return out

    def sleep(self) -> dict | None:
        report = self.learner.sleep(self.data.config.sleep_budget_s)
        return report.to_dict() if hasattr(report, "to_dict") else {"report": repr(report)}

    def info(self) -> dict:
        return {"memory_used": len(self.learner.memory), "capacity": self.data.config.memory,
                "stored_total": self.learner.n_stored,
                "config_overrides": list(self.data.config.reverie_overrides)}


def learner_config(base, overrides: tuple[str, ...]):
    """``base`` (a LearnerConfig) with ``key=value`` overrides; ``sleep.key=value`` sets a
    SleepConfig field. Values are parsed as the field's current type (bool: true/false)."""
    from dataclasses import fields, replace

    def parse(obj, key: str, text: str, item: str):
        known = {f.name for f in fields(obj)}
        if key not in known:
            raise ConfigError(f"--reverie {item}: unknown field {key!r} (known: "
                              f"{', '.join(sorted(known))})")
        kind = type(getattr(obj, key))
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                return text.lower() in ("true", "1")
            return kind(text) if kind in (int, float, str) else None
        except ValueError:
            raise ConfigError(f"--reverie {item}: expected a value of type {kind.__name__}") from None

    cfg = base
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--reverie {item!r}: expected key=value")
        section, _, sub = key.strip().rpartition(".")
        if section not in ("", "sleep"):
            raise ConfigError(f"--reverie {item}: only 'sleep.' fields are nested")
        target = cfg.sleep if section else cfg
        value = parse(target, sub, text.strip(), item)
        if value is None:
            raise ConfigError(f"--reverie {item}: {sub!r} cannot be set from the command line")
        cfg = (replace(cfg, sleep=replace(cfg.sleep, **{sub: value})) if section
               else replace(cfg, **{sub: value}))
    return cfg


# name -> what it is; `build_method` makes one. The order is the table's.
METHODS = {
    "reverie": "reverie Learner (memory + head), Learner.sleep between tasks",
    "reverie_no_sleep": "reverie Learner without sleep (the fast system's share)",
    "ncm": "frozen latent + nearest class mean",
    "slda": "frozen latent + streaming LDA (Hayes & Kanan 2020)",
    "minirocket_slda": "MiniRocket features (sktime, fitted on the base classes) projected to "
                       "512 dims + streaming LDA",
    "finetune": "frozen encoder + the bundle's head fine-tuned naively on the stream (SGD)",
    "replay": "frozen encoder + head fine-tuned with experience replay (class-balanced "
              "buffer of M latents)",
    "river_softmax": "river StandardScaler | SoftmaxRegression on raw inputs",
    "river_knn": "river KNNClassifier (LazySearch window) on raw inputs",
    "river_tree": "river HoeffdingTreeClassifier on raw inputs",
}


# Offline references trained on every class at once (not CL methods), reported beside
# the joint upper bound (which always runs) under ``joint_references``.
REFERENCES = {
    "minirocket_ridge": "MiniRocket (sktime) on all classes' training windows + "
                        "StandardScaler + RidgeClassifierCV",
}


def method_names(selected: tuple[str, ...] | None) -> list[str]:
    """The methods to run, in table order; unknown names raise ConfigError (a name of
    `REFERENCES` is accepted and selects that reference, see `reference_names`).
    Without `Learner.sleep`, ``reverie`` already runs without it and
    ``reverie_no_sleep`` is dropped (the same run twice)."""
    if selected is not None:
        unknown = [m for m in selected if m not in METHODS and m not in REFERENCES]
        if unknown or not selected:
            raise ConfigError(f"--methods {','.join(selected)}: unknown {unknown} (known: "
                              f"{', '.join([*METHODS, *REFERENCES])})")
    names = [m for m in METHODS if selected is None or m in selected]
    if not sleep_available() and "reverie" in names and "reverie_no_sleep" in names:
        names.remove("reverie_no_sleep")
    return names


def reference_names(selected: tuple[str, ...] | None) -> list[str]:
    """The joint references to run: all by default, else those named in ``--methods``."""
    return [r for r in REFERENCES if selected is None or r in selected]


def build_method(name: str, data: StreamData) -> Method:
    if name in ("reverie", "reverie_no_sleep"):
        return ReverieMethod(data, sleep=name == "reverie")
    if name.startswith("minirocket_"):
        from export.bench_cl import minirocket

        return minirocket.build(name, data)
    if name.startswith("river_"):
        from export.bench_cl import river_baselines

        return river_baselines.build(name, data)
    from export.bench_cl import baselines

    return baselines.build(name, data)


def sleep_available() -> bool:
    from agent.learner import Learner

    return hasattr(Learner, "sleep")


def _seen_rows(ds: Dataset, split: Split, upto: int) -> np.ndarray:
    """The test rows of tasks 0..upto."""
    return np.flatnonzero(split.task_of_class[ds.y_test] <= upto)


def _task_accuracies(pred: np.ndarray, rows: np.ndarray, ds: Dataset, split: Split,
                     upto: int) -> list[float]:
    """Accuracy of ``pred`` (on test ``rows``) on each task 0..upto's test windows."""
    task_test = split.task_of_class[ds.y_test[rows]]
    correct = pred == ds.y_test[rows]
    return [float(correct[task_test == j].mean()) for j in range(upto + 1)]


def _accuracies(method: Method, ds: Dataset, split: Split, upto: int) -> list[float]:
    """Row ``upto`` of R: accuracy on each task 0..upto's test windows."""
    rows = _seen_rows(ds, split, upto)
    return _task_accuracies(method.predict(rows), rows, ds, split, upto)


def novelty_point(method: Method, ds: Dataset, split: Split, task: int) -> dict | None:
    """Before task ``task`` is learned: how well the method's novelty score tells the
    test windows of the task's classes (novel, positive) from those of every class seen
    so far (known). None for a method without a novelty score."""
    rows = _seen_rows(ds, split, task)
    res = method.novelty(rows)
    if res is None:
        return None
    scores, flags = res
    novel = split.task_of_class[ds.y_test[rows]] == task
    auc = metrics.auroc(scores, novel)
    return {"task": task, "n_novel": int(novel.sum()), "n_known": int((~novel).sum()),
            "auroc": None if auc is None else round(auc, 6),
            "flag_rate": None if flags is None else round(float(flags[novel].mean()), 6),
            "false_alarm_rate": None if flags is None else round(float(flags[~novel].mean()), 6)}


def novelty_summary(points: list[dict], rule: str) -> dict:
    """Per-task novelty points and their means (JSON-ready)."""
    return {"auroc": metrics.mean_or_none(p["auroc"] for p in points),
            "flag_rate": metrics.mean_or_none(p["flag_rate"] for p in points),
            "false_alarm_rate": metrics.mean_or_none(p["false_alarm_rate"] for p in points),
            "flags": rule or None, "per_task": points}


def run_method(method: Method, ds: Dataset, split: Split, shots: tuple[int, ...],
               log: Callable[[str], None] = lambda _m: None) -> dict:
    """Run the protocol on one method; its metrics, matrices, few-shot and timings."""
    t_start = time.perf_counter()
    rows = [_accuracies(method, ds, split, 0)]
    before_sleep = [rows[0]] if method.sleeps else None
    shot_set = set(shots)
    few: dict[int, dict[int, tuple[float, float]]] = {}
    learn_s: list[float] = []
    sleeps: list[dict] = []
    novelty: list[dict] = []
    for i, order in enumerate(split.stream, start=1):
        point = novelty_point(method, ds, split, i)       # before any window of task i
        if point is not None:
            novelty.append(point)
        counts: dict[int, int] = {}
        for r in order.tolist():
            t0 = time.perf_counter()
            method.learn_one(r)
            learn_s.append(time.perf_counter() - t0)
            c = int(ds.y[r])
            counts[c] = counts.get(c, 0) + 1
            if counts[c] in shot_set:      # before any sleep: sleeps come after the stream
                few.setdefault(c, {})[counts[c]] = _few_shot_point(method, ds, split, i,
                                                                   counts, c)
        if method.sleeps:
            before_sleep.append(_accuracies(method, ds, split, i))
            t0 = time.perf_counter()
            report = method.sleep()
            sleeps.append({"after_task": i, "duration_s": round(time.perf_counter() - t0, 4),
                           "report": report})
        rows.append(_accuracies(method, ds, split, i))
        log(f"  {method.name}: task {i}/{split.n_tasks} ({', '.join(split.names(i))}): "
            f"mean accuracy over seen tasks {100 * np.mean(rows[-1]):.1f} %")
    R = metrics.accuracy_matrix(rows)
    out = {"description": method.description, "stored": method.stored, **metrics.summary(R)}
    out["novelty"] = novelty_summary(novelty, method.novelty_rule) if novelty else None
    final_rows = _seen_rows(ds, split, split.n_tasks)
    readouts = method.readout_predictions(final_rows)
    if readouts is not None:       # ACC of each readout on the last evaluation's rows
        out["readouts"] = {name: round(float(np.mean(_task_accuracies(
            pred, final_rows, ds, split, split.n_tasks))), 6) for name, pred in readouts.items()}
    out["few_shot"] = few_shot_summary(few, shots, ds.classes)
    out["time_per_window_us"] = round(1e6 * float(np.mean(learn_s)), 2)
    out["time_per_window_p50_us"] = round(1e6 * float(np.median(learn_s)), 2)
    out["time_per_sleep_s"] = (round(float(np.mean([s["duration_s"] for s in sleeps])), 4)
                               if sleeps else None)
    if method.sleeps:
        out["acc_matrix_before_sleep"] = metrics.to_json(metrics.accuracy_matrix(before_sleep))
        out["sleeps"] = sleeps
    out.update(method.info())
    out["wall_time_s"] = round(time.perf_counter() - t_start, 3)
    return out


def _few_shot_point(method: Method, ds: Dataset, split: Split, task: int,
                    counts: dict[int, int], c: int) -> tuple[float, float]:
    """(accuracy on class c's test windows, accuracy on the test windows of the other
    classes seen so far), in one prediction over both."""
    seen = [k for k in range(len(ds.classes))
            if split.task_of_class[k] < task or counts.get(k, 0) > 0]
    rows = np.flatnonzero(np.isin(ds.y_test, seen))
    correct = method.predict(rows) == ds.y_test[rows]
    mine = ds.y_test[rows] == c
    return float(correct[mine].mean()), float(correct[~mine].mean())


def few_shot_summary(few: dict[int, dict[int, tuple[float, float]]], shots: tuple[int, ...],
                     classes: tuple[str, ...]) -> dict:
    """Per n: mean accuracy on each new class's test windows right after its n-th labelled
    window (over the classes with at least n training windows), and, under
    ``others_acc``, the mean accuracy on the other seen classes at the same moments (a
    learner that predicts the new class everywhere scores 1.0 on the first, ~0 on the
    second); ``per_class`` gives the first per class."""
    out: dict = {"others_acc": {}}
    for n in shots:
        vals = [v[n] for v in few.values() if n in v]
        out[str(n)] = round(float(np.mean([a for a, _ in vals])), 6) if vals else None
        out["others_acc"][str(n)] = (round(float(np.mean([o for _, o in vals])), 6)
                                     if vals else None)
    out["per_class"] = {classes[c]: {str(n): round(a, 6) for n, (a, _) in v.items()}
                        for c, v in sorted(few.items())}
    return out
