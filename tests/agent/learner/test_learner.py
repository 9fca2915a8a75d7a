"""Learner: predict, learn a new class from a few windows, reject bad input, persist."""

import numpy as np
import pytest

from agent.errors import ConfigError, InputError, StateError
from agent.learner import Learner, LearnerConfig
from tests.agent.learner.conftest import BASE, NEW, windows


@pytest.fixture
def learner(base_bundle):
    with Learner.from_bundle(base_bundle, LearnerConfig(capacity=500)) as L:
        yield L


def test_predicts_base_classes_with_the_head(learner, base_bundle):
    x = windows("run", 20, seed=3)
    preds = learner.predict_many(x)
    assert all(abs(p.probs.sum() - 1) < 1e-6 and p.classes == BASE for p in preds)
    assert sum(p.label == "run" for p in preds) >= 15   # the small test model is ~85-95%
    # Only base classes known: the head decides, the memory's schema may overrule it, and
    # "fast" says exactly that it did (the answer is not the bare head's).
    head = [BASE[i] for i in learner.adapted_head.logits(learner.encoder.encode(x)).argmax(1)]
    assert [p.decided_by == "fast" for p in preds] == [p.label != h for p, h in zip(preds, head, strict=True)]
    with Learner.from_bundle(base_bundle, LearnerConfig(capacity=500, schema_weight=0,
                                                        knn_weight=0)) as alone:
        lone = alone.predict_many(x)
        assert [p.label for p in lone] == head               # the head alone decides
        assert "fast" not in {p.decided_by for p in lone}
    one = learner.predict_one(windows("idle", 1, seed=4)[0])
    assert one.label == "idle" and 0 < one.confidence <= 1 and one.latency_us > 0


def test_learns_a_new_class_from_five_windows_without_forgetting(learner):
    test_old = {c: windows(c, 20, seed=11) for c in BASE}
    before = np.mean([p.label == c for c in BASE for p in learner.predict_many(test_old[c])])
    results = [learner.learn_one(w, "shake") for w in windows("shake", 5, seed=1)]
    assert results[0].new_class and results[0].stored and results[0].surprise == 1.0
    assert all(r.stored for r in results)  # a class with few episodes always stores
    assert learner.classes[-1] == "shake"
    preds = learner.predict_many(windows("shake", 20, seed=12))
    assert np.mean([p.label == "shake" for p in preds]) >= 0.8
    assert any(p.decided_by == "fast" for p in preds)
    after = np.mean([p.label == c for c in BASE for p in learner.predict_many(test_old[c])])
    assert after >= before - 0.05


@pytest.mark.parametrize("bad, match", [
    (np.full((6, 128), np.nan, np.float32), "NaN/Inf"),
    (np.zeros((6, 100), np.float32), r"expected \(6, 128\)"),
    (np.zeros((128, 6), np.float32), r"expected \(6, 128\)"),
    (np.array([["a"] * 128] * 6), "dtype"),
])
def test_bad_windows_are_rejected_before_memory(learner, bad, match):
    n = len(learner.memory)
    with pytest.raises(InputError, match=match):
        learner.learn_one(bad, "shake")
    with pytest.raises(InputError, match=match):
        learner.predict_one(bad)
    assert len(learner.memory) == n and learner.classes == list(BASE)


@pytest.mark.parametrize("label", ["", "x" * 65, "bad\nline", 3, None])
def test_bad_labels_are_rejected(learner, label):
    with pytest.raises(InputError, match="label"):
        learner.learn_one(windows("tilt", 1)[0], label)
    assert learner.classes == list(BASE)


def test_the_schema_starts_from_every_training_latent_of_the_bundle(learner):
    """Seeded from the bundle's class statistics (all training latents), not only from the
    20 exemplars per class the memory stores; then every stored episode adds to it."""
    n_training = int(learner._exemplars["class_counts"].sum())
    assert len(learner.memory) == 20 * len(BASE) < n_training          # 20 stored per class
    assert learner.memory.schema.n_observed() == n_training
    learner.learn_one(windows("shake", 1, seed=2)[0], "shake")
    assert learner.memory.schema.n_observed() == n_training + 1


@pytest.mark.parametrize("field,value", [
    ("schema_weight", 1.5), ("schema_temperature", 0.0), ("knn_weight", -0.1),
    ("head_weight", True), ("fusion", "vote"), ("fusion_eta", -1.0), ("fusion_decay", 0.0),
    ("sparse_codes", "yes")])
def test_bad_schema_settings_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"learner.{field}="):
        LearnerConfig(**{field: value})


def test_state_survives_restart_via_log_and_checkpoint(base_bundle, tmp_path):
    cfg = LearnerConfig(capacity=200, checkpoint_every=7, surprise_threshold=0.0)
    X = windows("tilt", 10, seed=5)
    with Learner.from_bundle(base_bundle, cfg, state_dir=tmp_path / "s") as L:
        for i, w in enumerate(X):
            L.learn_one(w, NEW[i % 2], ts=1000.0 + i)     # checkpoint at 7, 3 in the log
        probe = L.predict_many(windows("shake", 5, seed=9))
        ids = L.memory.ids()
    with Learner.load(tmp_path / "s", base_bundle, cfg) as L2:
        assert L2.classes == list(BASE) + list(NEW)
        np.testing.assert_array_equal(L2.memory.ids(), ids)
        again = L2.predict_many(windows("shake", 5, seed=9))
        assert [p.label for p in again] == [p.label for p in probe]
        np.testing.assert_allclose([p.probs for p in again], [p.probs for p in probe], atol=1e-6)
        assert not L2.recovery_warnings


def test_save_to_another_directory_and_load(learner, base_bundle, tmp_path):
    for w in windows("shake", 3, seed=2):
        learner.learn_one(w, "shake")
    learner.save(tmp_path / "copy")
    with Learner.load(tmp_path / "copy", base_bundle, LearnerConfig(capacity=500)) as L2:
        assert L2.classes == learner.classes
        np.testing.assert_array_equal(L2.memory.ids(), learner.memory.ids())


def test_state_of_another_bundle_is_refused(base_bundle, sim_bundle, tmp_path):
    with Learner.from_bundle(base_bundle, LearnerConfig(capacity=50),
                             state_dir=tmp_path / "s") as L:
        L.learn_one(windows("tilt", 1)[0], "tilt")
        L.checkpoint()
    with pytest.raises(StateError, match="learned on bundle"):
        Learner.load(tmp_path / "s", sim_bundle, LearnerConfig(capacity=50))


@pytest.mark.parametrize("kw", [{"readout": "vote"}, {"assoc_weight": 0.25},
                                {"readout": "vote", "assoc_weight": 1.0}])
def test_other_readouts_learn_too(base_bundle, kw):
    with Learner.from_bundle(base_bundle, LearnerConfig(capacity=300, **kw)) as L:
        for w in windows("tilt", 5, seed=1):
            L.learn_one(w, "tilt")
        preds = L.predict_many(windows("tilt", 10, seed=7))
        assert np.mean([p.label == "tilt" for p in preds]) >= 0.7
        assert all(abs(p.probs.sum() - 1) < 1e-6 for p in preds)


@pytest.mark.parametrize("stored", [True, False], ids=["episode", "not-stored"])
def test_learn_returns_only_after_its_log_record_is_fsynced(base_bundle, tmp_path,
                                                           faulty_disk, stored):
    """The daemon acknowledges a label when learn_one returns: its record (an episode, or
    the record of a label not stored) must be fsynced by then. Traced at the system calls:
    a missing fsync is invisible to every crash test short of a power cut."""
    cfg = LearnerConfig(capacity=500, min_class_episodes=0, store_confident_rate=0.0,
                        surprise_threshold=0.0 if stored else 1.0)
    with Learner.from_bundle(base_bundle, cfg, state_dir=tmp_path / "state") as L:
        disk = faulty_disk(what=("write", "fsync"), match="/wal/", trace=True)
        r = L.learn_one(windows("run", 1, seed=5)[0], "run", key="k1")
        assert r.stored is stored
        assert [kind for kind, _ in disk.trace] == ["write", "fsync"], disk.trace
        assert disk.trace[0][1] == disk.trace[1][1]
