"""Fusion that learns which readout to trust: the prequential record, the pooling, and a
learner whose weights follow what each readout gets right on its own labels."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import StateError
from agent.learner import Learner, LearnerConfig, fusion
from agent.learner.trust import READOUTS, ReadoutTrust
from tests.agent.learner.conftest import BASE, windows

ABC = ("head", "knn", "schema")


def test_weights_follow_the_readout_that_is_right():
    t = ReadoutTrust((1, 1, 1), eta=0.5, decay=1.0, names=ABC, score="log")
    np.testing.assert_allclose(t.weights(), [1 / 3] * 3)
    for _ in range(20):               # knn right and sure, schema right and unsure, head wrong
        t.update(np.array([0.05, 0.95, 0.6]), np.array([False, True, True]))
    w = t.weights()
    assert w[1] > w[2] > w[0] and w[0] < 0.01
    acc = t.accuracy()
    assert acc == {"head": 0.0, "knn": 1.0, "schema": 1.0}
    assert t.summary()["windows_scored"] == 20


def test_a_discounted_record_lets_a_readout_win_back_its_say():
    t = ReadoutTrust((1, 1, 1), eta=0.5, decay=0.9, names=ABC, score="log")
    for _ in range(30):
        t.update(np.array([0.01, 0.9, 0.5]), np.array([False, True, False]))
    assert t.weights()[0] < 0.01
    for _ in range(60):               # the head got good (a sleep consolidated the class)
        t.update(np.array([0.99, 0.5, 0.5]), np.array([True, False, False]))
    assert t.weights().argmax() == 0


def test_a_readout_with_prior_zero_stays_off():
    t = ReadoutTrust((1, 0, 1), eta=1.0, decay=1.0, names=ABC)
    for _ in range(10):
        t.update(np.array([0.1, 1.0, 0.1]), np.array([False, True, False]))
    assert t.weights()[1] == 0.0 and t.weights().sum() == pytest.approx(1.0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)), max_size=30),
       st.floats(0.5, 1.0), st.floats(0.0, 2.0))
def test_state_round_trip_and_weights_are_a_distribution(rows, decay, eta):
    t = ReadoutTrust((1, 1, 1), eta=eta, decay=decay, names=ABC)
    for p in rows:
        p = np.array(p)
        t.update(p, p > 0.5)
    w = t.weights()
    assert np.isfinite(w).all() and (w >= 0).all() and w.sum() == pytest.approx(1.0)
    again = ReadoutTrust((1, 1, 1), eta=eta, decay=decay, names=ABC)
    again.restore(t.state())
    np.testing.assert_allclose(again.weights(), w)
    assert again.state() == t.state()


@pytest.mark.parametrize("state", [
    {"names": ["head", "knn"], "log_score": [0, 0], "hits": [0, 0], "n": 0, "n_total": 0},
    {"names": list(READOUTS), "log_score": [1.0, 0, 0, 0], "hits": [0] * 4, "n": 1,
     "n_total": 1},
    {"names": list(READOUTS), "log_score": [0, 0], "hits": [0] * 4, "n": 1, "n_total": 1},
    {"names": list(READOUTS)},
    [],
])
def test_a_state_that_does_not_fit_is_refused(state):
    with pytest.raises(StateError, match="trust state"):
        ReadoutTrust().restore(state)


def test_mix_readouts_hand_checked():
    P = np.array([
        [[0.8, 0.2, 0.0], [0.5, 0.5, 0.0]],       # head (its classes: 0, 1)
        [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]],       # knn: row 1 knows nothing
        [[0.0, 1.0, 0.0], [0.2, 0.8, 0.0]],       # schema
    ])
    p_head = np.array([[0.8, 0.2], [0.5, 0.5]])
    probs, who = fusion.mix_readouts(P, np.array([0.5, 0.25, 0.25]), p_head)
    np.testing.assert_allclose(probs, [[0.4, 0.35, 0.25], [0.5 * 2 / 3 + 0.2 / 3,
                                                           0.5 * 2 / 3 + 0.8 / 3, 0.0]])
    assert who == ["slow", "fast"]
    # weights on readouts that know nothing fall back to those that do
    probs, _ = fusion.mix_readouts(P, np.array([0.0, 1.0, 0.0]), p_head)
    np.testing.assert_allclose(probs[1], [0.5 * 0.5 + 0.5 * 0.2, 0.5 * 0.5 + 0.5 * 0.8, 0.0])


def test_the_learner_stops_trusting_a_readout_that_is_wrong_here(base_bundle):
    """On this device 'run' windows are labelled 'walk' (a base class): the bundle's head
    keeps saying 'run', the memory learns what the device's labels mean. Test-then-train
    scoring moves the fusion weights from the head to the memory's readouts, and the
    fused prediction follows the device's labels."""
    cfg = LearnerConfig(capacity=500, fusion_decay=1.0)
    with Learner.from_bundle(base_bundle, cfg) as L:
        w0 = L.trust.weights().copy()
        for w in windows("run", 40, seed=21):
            L.learn_one(w, "walk")
        w1 = L.trust.weights()
        # The kNN follows the new meaning at once; the schema's 'run' mean still holds the
        # bundle's hundreds of training latents, so it is slower to move, and weighed down too.
        assert w1[0] < w0[0] / 5 and w1.argmax() == 1 and w1[3] < w0[3]
        acc = L.trust.accuracy()
        assert acc["head"] < 0.2 and acc["knn"] > acc["head"] + 0.25
        assert L.stats()["fusion"]["weights"]["head"] == pytest.approx(w1[0], abs=1e-4)
        probe = L.predict_many(windows("run", 20, seed=22))
        assert np.mean([p.label == "walk" for p in probe]) > 0.5
        fixed = Learner.from_bundle(base_bundle, LearnerConfig(capacity=500, fusion="fixed"))
        with fixed:
            for w in windows("run", 40, seed=21):
                fixed.learn_one(w, "walk")
            np.testing.assert_allclose(fixed._fusion_weights(), w0)


def test_readout_probs_names_every_readout_and_the_fused_one(base_bundle):
    with Learner.from_bundle(base_bundle, LearnerConfig(capacity=200)) as L:
        x = windows("idle", 4, seed=3)
        out = L.readout_probs(x)
        assert set(out) == {*READOUTS, "fused"}
        assert all(v.shape == (4, len(BASE)) for v in out.values())
        np.testing.assert_allclose(out["pool"], (out["head"] + out["knn"] + out["schema"]) / 3)
        np.testing.assert_allclose(out["fused"], [p.probs for p in L.predict_many(x)])


def test_the_record_survives_a_restart_through_the_log(base_bundle, tmp_path):
    cfg = LearnerConfig(capacity=300, checkpoint_every=10**6, surprise_threshold=0.0)
    with Learner.from_bundle(base_bundle, cfg, state_dir=tmp_path / "s") as L:
        for i, w in enumerate(windows("run", 12, seed=4)):
            L.learn_one(w, "walk", key=f"k{i}")
        state = L.trust.state()
    with Learner.load(tmp_path / "s", base_bundle, cfg) as again:      # log replay only
        assert again.trust.state()["n_total"] == state["n_total"] == 12
        np.testing.assert_allclose(again.trust.state()["log_score"], state["log_score"],
                                   atol=1e-3)           # the log rounds p to 6 digits
        again.checkpoint()
    with Learner.load(tmp_path / "s", base_bundle, cfg) as third:       # from the checkpoint
        np.testing.assert_allclose(third.trust.weights(), again.trust.weights())


def test_sparse_codes_are_off_by_default_and_follow_the_state(base_bundle, tmp_path):
    with Learner.from_bundle(base_bundle, LearnerConfig(capacity=100)) as L:
        assert L.coder is None and L.memory.config.code_k == 0
        L.learn_one(windows("tilt", 1)[0], "tilt")
    on = LearnerConfig(capacity=100, sparse_codes=True)
    with Learner.from_bundle(base_bundle, on, state_dir=tmp_path / "s") as L:
        assert L.coder is not None and L.memory.config.code_k == L.coder.k > 0
        L.learn_one(windows("tilt", 1)[0], "tilt")
        L.checkpoint()
    # A state written with codes keeps them under the default config (its episodes carry them).
    with Learner.load(tmp_path / "s", base_bundle, LearnerConfig(capacity=100)) as L:
        assert L.memory.config.code_k > 0 and L.coder is not None
        L.learn_one(windows("tilt", 1, seed=2)[0], "tilt")
