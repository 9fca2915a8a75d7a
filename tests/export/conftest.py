"""Datasets and trained bundles shared by the export tests (trained once per session)."""

from pathlib import Path

import numpy as np
import pytest

from agent.dataset import save_dataset

SYN_CLASSES = ("idle", "walk", "run", "shake")
SYN_SHAPE = (6, 128)  # (C, T)


def make_synthetic(n: int = 480, seed: int = 0, noise: float = 0.8
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(n, 6, 128) windows: one sinusoid frequency per class, random phase/gain, noise,
    and a per-channel offset (so normalization matters)."""
    rng = np.random.default_rng(seed)
    C, T = SYN_SHAPE
    y = np.arange(n) % len(SYN_CLASSES)
    t = np.arange(T) / 50.0                              # (T,) seconds at 50 Hz
    freq_hz = np.array([1.0, 2.0, 3.5, 5.0])[y]           # (N,)
    phase = rng.uniform(0, 2 * np.pi, (n, C, 1))          # (N, C, 1)
    gain = rng.uniform(0.5, 1.5, (n, C, 1))
    X = gain * np.sin(2 * np.pi * freq_hz[:, None, None] * t + phase)   # (N, C, T)
    X += noise * rng.standard_normal((n, C, T)) + np.linspace(-3, 3, C)[None, :, None]
    return X.astype(np.float32), np.asarray(SYN_CLASSES)[y]


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    return save_dataset(tmp_path_factory.mktemp("data") / "digits.npz", d.data, d.target)


@pytest.fixture(scope="session")
def synthetic_npz(tmp_path_factory) -> Path:
    X, y = make_synthetic()
    return save_dataset(tmp_path_factory.mktemp("data") / "synthetic.npz", X, y,
                        channels=[f"acc_{a}" for a in "xyz"] + [f"gyr_{a}" for a in "xyz"],
                        sample_rate_hz=50.0)


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory, digits_npz) -> Path:
    from export import train_bundle

    return train_bundle(digits_npz, tmp_path_factory.mktemp("bundles") / "digits", epochs=20,
                        verbose=False)


@pytest.fixture(scope="session")
def synthetic_bundle(tmp_path_factory, synthetic_npz) -> Path:
    from export import train_bundle

    # cnn1d, not the (C, T) default (minirocket, tests/export/test_minirocket.py): the
    # quantization and latency tests use it for the trained conv encoder's int8 path.
    return train_bundle(synthetic_npz, tmp_path_factory.mktemp("bundles") / "synthetic",
                        epochs=12, arch="cnn1d", verbose=False)


BASE_DIGITS = 5
SAE_TEST = {"n_units": 512, "active_fraction": 0.02, "steps": 300}  # k = 10


@pytest.fixture(scope="session")
def digits5_bundle(tmp_path_factory, digits_npz) -> Path:
    """Trained on digits 0-4 only, with a small sparse autoencoder."""
    from export import train_bundle
    from export.sae import SAEConfig

    return train_bundle(digits_npz, tmp_path_factory.mktemp("bundles") / "digits5", epochs=15,
                        base_classes=BASE_DIGITS, sae=SAEConfig(**SAE_TEST), verbose=False)
