"""AssociativeReadout: one-shot learning on sparse codes, locality of updates, state."""

import numpy as np
import pytest

from agent.errors import ConfigError
from agent.memory import (
    AssociativeReadout,
    MemoryInputError,
    MemoryStateError,
    ReadoutConfig,
    SparseCoder,
    SparseCoderConfig,
)


def test_one_shot_learning_and_new_classes_leave_old_units_alone():
    rng = np.random.default_rng(0)
    coder = SparseCoder(16, SparseCoderConfig(n_units=512, active_fraction=0.04, seed=1))
    ro = AssociativeReadout(ReadoutConfig(n_units=512, code_k=coder.k, lr=0.5))
    protos = rng.standard_normal((12, 16)).astype(np.float32)
    for label, p in enumerate(protos[:6]):
        ro.learn(coder.encode_one(p), label)
    before = ro.weights_.copy()
    for label, p in enumerate(protos[6:], start=6):      # learning new classes...
        ro.learn(coder.encode_one(p), label)
    changed_rows = np.flatnonzero((ro.weights_[:, :6] != before[:, :6]).any(axis=1))
    assert changed_rows.size == 0                        # ...never changes old classes' weights
    noisy = protos + 0.1 * rng.standard_normal(protos.shape).astype(np.float32)
    pred = [int(np.argmax(ro.scores(c))) for c in coder.encode(noisy)]
    assert pred == list(range(12))
    s = ro.scores(coder.encode_one(protos[3]))
    assert s.shape == (12,) and s.dtype == np.float32 and 0 <= s.min() and s.max() <= 1


def test_scores_are_mean_active_weight():
    ro = AssociativeReadout(ReadoutConfig(n_units=10, code_k=2, lr=1.0))
    ro.learn([1, 2], 0)
    ro.learn([2, 3], 1)
    np.testing.assert_allclose(ro.scores([2, 3]), [0.5, 1.0])
    np.testing.assert_allclose(ro.scores([5, 6]), [0.0, 0.0])


def test_validation_and_state():
    ro = AssociativeReadout(ReadoutConfig(n_units=10, code_k=2))
    with pytest.raises(MemoryInputError, match=r"expected \(2,\)"):
        ro.learn([1, 2, 3], 0)
    with pytest.raises(MemoryInputError, match="unit id 10, expected >= 0 and < 10"):
        ro.learn([1, 10], 0)
    with pytest.raises(MemoryInputError, match="label=-1"):
        ro.learn([1, 2], -1)
    with pytest.raises(ConfigError, match="lr=0"):
        ReadoutConfig(lr=0)
    for label in (0, 20):    # grows past its initial 8 columns
        ro.learn([1, 2], label)
    again = AssociativeReadout.from_state(ro.config, ro.state_arrays())
    assert again.n_classes == 21
    np.testing.assert_array_equal(again.scores([1, 2]), ro.scores([1, 2]))
    with pytest.raises(MemoryStateError, match=r"expected \(10, n_classes\) float32"):
        AssociativeReadout.from_state(ro.config, {"weights": np.zeros((9, 3), np.float32)})
