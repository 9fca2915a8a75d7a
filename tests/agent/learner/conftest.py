import numpy as np

from firmware_sim.signals import SignalGenerator

BASE = ("idle", "walk", "run", "stairs")     # the base model knows these
NEW = ("shake", "tilt")                      # the device learns these
# The session fixture `base_bundle` (trained on BASE) lives in tests/agent/conftest.py,
# shared with tests/agent/sleep.


def windows(cls: str, n: int, seed: int = 0) -> np.ndarray:
    """n independent (6, 128) windows of one simulated class."""
    gen = SignalGenerator(seed)
    return np.stack([gen.window(cls, 128).T for _ in range(n)]).astype(np.float32)
