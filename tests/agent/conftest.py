import errno
import os

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


def fd_path(fd: int) -> str:
    """The file an open descriptor names ("" if unknown)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class FaultyDisk:
    """Fault injection: patches os.write / fsync so that the `fail_at`-th call (1-based)
    fails, or, while `full` is True, every write fails with ENOSPC (a full disk).

    A failing `fail_at` write first writes half of its buffer for real, as a disk that
    fills up mid-write does. `calls` counts the calls seen, so a test can first count them
    on a clean run and then fail each one in turn. With `match`, only calls on files whose
    path contains it are counted or failed; with `trace`, each counted call is recorded
    in `trace` as ``(kind, path)`` (kind "write" or "fsync"), in order, from any thread.
    """

    def __init__(self, monkeypatch, fail_at=None, err=errno.ENOSPC, what=("write",),
                 match: str | None = None, trace: bool = False):
        self.calls = 0
        self.fail_at = fail_at
        self.err = err
        self.full = False
        self.trace: list[tuple[str, str]] = []
        real_write, real_fsync, real_fdatasync = os.write, os.fsync, os.fdatasync

        def counted(kind, fd) -> bool:
            """Count the call; True if it is to fail."""
            if match is not None or trace:
                path = fd_path(fd)
                if match is not None and match not in path:
                    return False
                if trace:
                    self.trace.append((kind, path))
            self.calls += 1
            return self.calls == self.fail_at

        def write(fd, data):
            if counted("write", fd):
                half = memoryview(data)[: len(data) // 2]
                if len(half):
                    real_write(fd, half)
                raise OSError(self.err, os.strerror(self.err))
            if self.full and (match is None or match in fd_path(fd)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        def failing(real):
            def sync(fd):
                if counted("fsync", fd):
                    raise OSError(self.err, os.strerror(self.err))
                return real(fd)
            return sync

        if "write" in what:
            monkeypatch.setattr(os, "write", write)
        if "fsync" in what:
            monkeypatch.setattr(os, "fsync", failing(real_fsync))
            monkeypatch.setattr(os, "fdatasync", failing(real_fdatasync))


@pytest.fixture
def faulty_disk(monkeypatch):
    def make(**kwargs):
        return FaultyDisk(monkeypatch, **kwargs)
    return make


@pytest.fixture
def start_daemon(broker_url, broker):
    """``start(bundle, device, protocol=None, **config)``: a started, connected `Daemon` on
    the test broker (config as `tests.agent.test_daemon.agent_config`), stopped at the end."""
    from agent.daemon import Daemon
    from tests.agent.test_daemon import agent_config

    made = []

    def start(bundle, device, protocol=None, **kw):
        d = Daemon(agent_config(bundle, broker_url, device, protocol or broker.protocols[-1],
                                **kw))
        made.append(d)
        d.start()
        assert d.wait_connected(10)
        return d

    yield start
    for d in made:
        d.stop()
