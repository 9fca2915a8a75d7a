import pytest

from firmware_sim.signals import write_dataset
from tests.agent.learner.conftest import BASE


@pytest.fixture(scope="session")
def base_bundle(tmp_path_factory):
    """A cnn1d bundle trained on 4 of the simulator's 6 classes (shared: do not modify).

    Used by tests/agent/learner and tests/agent/sleep; `windows`, BASE and NEW are in
    tests/agent/learner/conftest.py.
    """
    from export import train_bundle

    root = tmp_path_factory.mktemp("base-bundle")
    data = write_dataset(root / "train.npz", n_per_class=60, seed=0)
    return train_bundle(data, root / "bundle", epochs=12, seed=0, name="test-base4",
                        base_classes=len(BASE), verbose=False)
