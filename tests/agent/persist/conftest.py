"""Fault injection for the persistence tests: a disk that fills up, an fsync that fails."""

import errno
import os

import pytest


class FaultyDisk:
    """Patches os.write / fsync so that the `fail_at`-th call (1-based) fails.

    A failing write first writes half of its buffer for real, as a disk that fills up
    mid-write does. `calls` counts the calls seen, so a test can first count them on a
    clean run and then fail each one in turn.
    """

    def __init__(self, monkeypatch, fail_at=None, err=errno.ENOSPC, what=("write",)):
        self.calls = 0
        self.fail_at = fail_at
        self.err = err
        real_write, real_fsync, real_fdatasync = os.write, os.fsync, os.fdatasync

        def write(fd, data):
            self.calls += 1
            if self.calls == self.fail_at:
                half = memoryview(data)[: len(data) // 2]
                if len(half):
                    real_write(fd, half)
                raise OSError(self.err, os.strerror(self.err))
            return real_write(fd, data)

        def failing(real):
            def sync(fd):
                self.calls += 1
                if self.calls == self.fail_at:
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
