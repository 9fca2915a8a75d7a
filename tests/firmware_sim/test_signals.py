import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dataset import load_dataset
from firmware_sim.signals import (
    CHANNELS,
    CLASSES,
    SAMPLE_RATE_HZ,
    SignalGenerator,
    make_dataset,
    write_dataset,
)


def test_constants():
    assert CHANNELS == ("ax", "ay", "az", "gx", "gy", "gz")
    assert SAMPLE_RATE_HZ == 50.0
    assert len(CLASSES) >= 6 and len(set(CLASSES)) == len(CLASSES)


@pytest.mark.parametrize("cls", CLASSES)
def test_samples_shape_dtype_finite(cls):
    x = SignalGenerator(seed=0).samples(cls, 100)
    assert x.shape == (100, 6) and x.dtype == np.float32
    assert np.isfinite(x).all()


def test_samples_deterministic_under_seed():
    def stream(seed):
        gen = SignalGenerator(seed)
        return np.concatenate([gen.samples(c, 37) for c in ("walk", "run", "walk", "tilt")])

    np.testing.assert_array_equal(stream(5), stream(5))
    assert not np.allclose(stream(5), stream(6))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=6), st.sampled_from(CLASSES))
def test_samples_chunking_does_not_change_the_stream(chunks, cls):
    whole = SignalGenerator(9).samples(cls, sum(chunks))
    gen = SignalGenerator(9)
    parts = np.concatenate([gen.samples(cls, n) for n in chunks])
    np.testing.assert_allclose(parts, whole, atol=1e-5)
    assert gen.t_s == pytest.approx(sum(chunks) / SAMPLE_RATE_HZ)


def test_t0_jumps_the_stream_clock():
    gen = SignalGenerator(1)
    gen.samples("walk", 10)
    gen.samples("walk", 16, t0=3.0)
    assert gen.t_s == pytest.approx(3.0 + 16 / SAMPLE_RATE_HZ)


def test_idle_reads_gravity_and_little_rotation():
    x = SignalGenerator(2).samples("idle", 500)
    assert np.linalg.norm(x[:, :3].mean(0)) == pytest.approx(1.0, abs=0.05)  # 1 g
    assert np.abs(x[:, 3:]).mean() < 0.1  # rad/s


def test_unknown_class_is_rejected():
    with pytest.raises(ValueError, match="Unknown signal class: 'swim'"):
        SignalGenerator(0).samples("swim", 4)
    with pytest.raises(ValueError, match="swim"):
        make_dataset(2, classes=["walk", "swim"])


def test_make_dataset_layout_and_determinism():
    X, y, classes = make_dataset(5, window=64, seed=3)
    assert classes == CLASSES
    assert X.shape == (5 * len(CLASSES), 6, 64) and X.dtype == np.float32
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [5] * len(CLASSES)
    X2, y2, _ = make_dataset(5, window=64, seed=3)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)
    assert not np.allclose(make_dataset(5, window=64, seed=4)[0], X)


def test_make_dataset_class_subset_keeps_order():
    X, y, classes = make_dataset(3, classes=["shake", "idle"], seed=0)
    assert classes == ("shake", "idle")
    assert sorted(set(y.tolist())) == [0, 1]
    # shake moves far more than idle: labels index the given order
    assert X[y == 0].std(-1).mean() > 5 * X[y == 1].std(-1).mean()


def _features(X: np.ndarray) -> np.ndarray:
    """Per-channel mean, std and log spectrum: a deliberately simple baseline."""
    spectrum = np.abs(np.fft.rfft(X - X.mean(-1, keepdims=True), axis=-1))[..., 1:33]
    return np.concatenate([X.mean(-1), X.std(-1),
                           np.log1p(spectrum).reshape(len(X), -1)], axis=1)


def test_classes_are_separable_by_nearest_class_mean():
    # A failure here means the generator broke (classes collapsed), not that a model is weak.
    X, y, classes = make_dataset(60, seed=0)
    X_test, y_test, _ = make_dataset(40, seed=1)
    F, F_test = _features(X), _features(X_test)
    mu, sd = F.mean(0), F.std(0) + 1e-9
    F, F_test = (F - mu) / sd, (F_test - mu) / sd
    centroids = np.stack([F[y == k].mean(0) for k in range(len(classes))])
    pred = np.argmin(((F_test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (pred == y_test).mean()
    assert accuracy > 0.85, f"nearest-class-mean accuracy {accuracy:.3f}"


def test_windows_of_one_class_vary():
    X, y, _ = make_dataset(10, seed=0)
    walk = X[y == CLASSES.index("walk")]
    assert np.abs(walk[0] - walk[1]).mean() > 0.05


def test_write_dataset_is_loadable(tmp_path):
    path = write_dataset(tmp_path / "imu.npz", n_per_class=10, window=32,
                         classes=["idle", "walk", "run"], seed=1)
    ds = load_dataset(path)
    assert ds.classes == ("idle", "walk", "run")
    assert ds.channels == CHANNELS
    assert ds.sample_rate_hz == SAMPLE_RATE_HZ
    assert ds.input_shape == (6, 32)
    assert len(ds.y) + len(ds.y_test) == 30
