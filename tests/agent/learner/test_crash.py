"""kill -9 while the learner learns and checkpoints: every acknowledged episode survives.

A child process learns windows durably (``surprise_threshold=0``: every window is stored)
and checkpoints every few episodes, printing each episode's ``ts`` after `learn_one`
returns: that is the acknowledgement. The parent SIGKILLs it at a random moment, restarts
it on the same state directory, and after each kill checks, on a fresh Learner, that every
acknowledged episode is in memory exactly once and the state loads without warnings.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from agent.learner import Learner, LearnerConfig

# Large enough that nothing is ever evicted: an evicted episode is forgotten on purpose,
# which this test must not mistake for a lost one (checked in `_check`).
CAPACITY = 100_000

CHILD = f"CAPACITY = {CAPACITY}\n" + r"""
import sys, time
import numpy as np
from agent.learner import Learner, LearnerConfig
from firmware_sim.signals import SignalGenerator
bundle, state, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = LearnerConfig(capacity=CAPACITY, surprise_threshold=0.0, checkpoint_every=5, durable=True)
L = Learner.load(state, bundle, cfg)
print("ready", flush=True)
gen = SignalGenerator(start)
classes = ["idle", "walk", "shake", "tilt"]
for i in range(start, start + 10_000):
    L.learn_one(gen.window(classes[i % 4], 128).T, classes[i % 4], ts=float(i))
    print(i, flush=True)
"""


def _acknowledged(out: str) -> list[int]:
    acks = []
    for line in out.splitlines():
        if line.strip().isdigit():
            acks.append(int(line))
    return acks


def _check(bundle, state, acked: set[int]) -> int:
    cfg = LearnerConfig(capacity=CAPACITY)
    with Learner.load(state, bundle, cfg) as L:
        assert not L.recovery_warnings, L.recovery_warnings
        mem = L.memory
        assert len(mem) < CAPACITY, "the memory filled up: eviction would look like loss"
        ts = mem.get(mem.ids()).created_ts
        ts = ts[ts > 0.5].astype(np.int64)          # exemplars (if any) have ts 0
        assert len(ts) == len(set(ts.tolist())), "an episode was stored twice"
        missing = acked - set(ts.tolist())
        assert not missing, f"acknowledged episodes lost: {sorted(missing)[:10]}"
        return int(ts.max()) + 1 if len(ts) else 1


def _run(bundle, state, cycles: int, seed: int):
    rng = np.random.default_rng(seed)
    acked: set[int] = set()
    start = 1
    env = dict(os.environ)
    for _ in range(cycles):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(bundle), str(state), str(start)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        # Kill at a random moment after start-up (recovery itself is killed in the persist
        # tests); waiting for "ready" keeps a slow start from eating the whole window.
        first = proc.stdout.readline()
        time.sleep(float(rng.uniform(0.2, 2.0)))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        out = first + out
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        acked |= set(_acknowledged(out))
        start = _check(bundle, state, acked)
    return acked


def test_sigkill_while_learning_loses_no_acknowledged_episode(base_bundle, tmp_path):
    acked = _run(base_bundle, tmp_path / "state", cycles=6, seed=1)
    assert len(acked) >= 10, "the child never got going: the test proved nothing"


@pytest.mark.slow
def test_sigkill_campaign(base_bundle, tmp_path):
    acked = _run(base_bundle, tmp_path / "state", cycles=60, seed=2)
    assert len(acked) >= 200
