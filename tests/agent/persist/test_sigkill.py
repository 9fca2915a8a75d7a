"""THE crash test: SIGKILL a learning, checkpointing process at random moments, many times.

After every kill the state is recovered (on a copy, so the next child still meets the raw
crash state and recovers it itself) and checked: every acknowledged episode is there
exactly once with the right bytes, nothing is reported damaged (a torn log tail is the
only expected repair), checkpoint files agree with each other.
"""

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.persist import StateDir
from tests.agent.persist.crash_child import rebuild, vector

CHILD = Path(__file__).with_name("crash_child.py")
REPO = Path(__file__).resolve().parents[3]
MODES = ("anytime", "learning", "checkpoint")  # when the kill is aimed


class Child:
    def __init__(self, root: Path, seed: int, ballast_bytes: int):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(root), str(seed), str(ballast_bytes)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.seen: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, prefix: bytes, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if line.startswith(prefix):
                return True
        self.fail_if_dead()
        return False

    def fail_if_dead(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"child exited by itself ({self.proc.returncode}):\n"
                                 f"{self.proc.stderr.read().decode()}")

    def kill(self) -> list[str]:
        self.fail_if_dead()
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL
        self._reader.join(timeout=10)
        self.proc.stderr.close()
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        self.proc.stdout.close()
        # A line cut short by the kill is not an acknowledgement.
        return [b.decode().split() for b in self.seen if b.endswith(b"\n")]


def verify(root: Path, acked: dict[int, int], scratch: Path) -> tuple[int, list[str]]:
    """Recover a copy of `root`; check it against every acknowledgement so far."""
    shutil.rmtree(scratch, ignore_errors=True)
    if root.exists():  # (not yet if the first child died in start-up)
        shutil.copytree(root, scratch)
    with StateDir(scratch) as state:
        rec = state.recover()
    unexpected = [w for w in rec.warnings if "torn record" not in w]
    assert not unexpected, unexpected
    ids, seqs, xs = rebuild(rec)
    assert ids == list(range(1, len(ids) + 1)), "an episode is missing or duplicated"
    assert seqs == ids, "log seqs skipped or repeated"  # one record per episode, from 1
    for episode, x in zip(ids, xs, strict=True):
        np.testing.assert_array_equal(x, vector(episode))
    lost = {e: s for e, s in acked.items() if e > len(ids) or seqs[e - 1] != s}
    assert not lost, f"acknowledged episodes lost: {sorted(lost)[:10]}"
    return len(ids), rec.warnings


def run_kill_cycles(tmp_path: Path, n_cycles: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    root, scratch = tmp_path / "state", tmp_path / "scratch"
    acked: dict[int, int] = {}
    stats = {"cycles": n_cycles, "acked": 0, "kills_in_checkpoint": 0,
             "kills_before_ready": 0, "torn_tails_repaired": 0, "episodes_recovered": 0}
    for cycle in range(n_cycles):
        mode = MODES[cycle % len(MODES)]
        child = Child(root, seed=int(rng.integers(2**31)), ballast_bytes=1 << 20)
        if mode == "anytime":  # may land in start-up or in the child's own recovery
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            assert child.wait_for(b"ready", timeout_s=30), "child never became ready"
            if mode == "learning":
                time.sleep(rng.uniform(0.0, 0.25))
            elif child.wait_for(b"ckpt-begin", timeout_s=10):
                time.sleep(rng.uniform(0.0, 0.02))
        lines = child.kill()
        kinds = [w[0] for w in lines]
        stats["kills_before_ready"] += "ready" not in kinds
        last = {k: max((i for i, w in enumerate(kinds) if w == k), default=-1)
                for k in ("ckpt-begin", "ckpt-end")}
        stats["kills_in_checkpoint"] += last["ckpt-begin"] > last["ckpt-end"]
        for words in lines:
            if words[0] == "ack":
                seq, episode = int(words[1]), int(words[2])
                assert episode not in acked, f"episode {episode} acknowledged twice"
                acked[episode] = seq
        n, warnings = verify(root, acked, scratch)
        stats["torn_tails_repaired"] += len(warnings)
        stats["episodes_recovered"] = n
    stats["acked"] = len(acked)
    # The real directory (not a copy) must recover too, and hold everything.
    verify(root, acked, scratch)
    return stats


def report(tmp_path: Path, stats: dict) -> None:
    print("\nSIGKILL test:", json.dumps(stats))
    (tmp_path / "sigkill_stats.json").write_text(json.dumps(stats))


def test_sigkill_at_random_moments_loses_no_acknowledged_episode(tmp_path):
    stats = run_kill_cycles(tmp_path, n_cycles=30, seed=1234)
    report(tmp_path, stats)
    assert stats["acked"] > 30
    assert stats["kills_in_checkpoint"] >= 1, "no kill landed inside a checkpoint"


@pytest.mark.slow
def test_sigkill_200_cycles(tmp_path):
    stats = run_kill_cycles(tmp_path, n_cycles=200, seed=99)
    report(tmp_path, stats)
    assert stats["kills_in_checkpoint"] >= 20
