import numpy as np
import pytest

from firmware_sim.signals import SignalGenerator, write_dataset

BASE = ("idle", "walk", "run", "stairs")     # the base model knows these
NEW = ("shake", "tilt")                      # the device learns these


@pytest.fixture(scope="session")
def base_bundle(tmp_path_factory):
    """A cnn1d bundle trained on 4 of the simulator's 6 classes (shared: do not modify)."""
    from export import train_bundle

    root = tmp_path_factory.mktemp("base-bundle")
    data = write_dataset(root / "train.npz", n_per_class=60, seed=0)
    return train_bundle(data, root / "bundle", epochs=12, seed=0, name="test-base4",
                        base_classes=len(BASE), verbose=False)


def windows(cls: str, n: int, seed: int = 0) -> np.ndarray:
    """n independent (6, 128) windows of one simulated class."""
    gen = SignalGenerator(seed)
    return np.stack([gen.window(cls, 128).T for _ in range(n)]).astype(np.float32)
