"""Disk faults of ``reverie bench chaos``: a full disk, and damaged state and bundle files.

Full disk: the state directory lives on a small tmpfs (``mount -t tmpfs -o size=32m``;
needs root or CAP_SYS_ADMIN, else the run is reported as skipped with the reason). Once
the daemon has learned and checkpointed, a filler file takes every free byte; then
labels (log appends) and a ``snapshot`` command (a checkpoint) hit ENOSPC. Shown: the
daemon reports it (``learn_failed`` error events, the command's error reply), keeps
predicting, a copy of the state taken while the disk is full loads with every label
learned before, and once the filler is gone the failed labels are learned (the worker
retries them; they were never acknowledged) exactly once.

Damage (persist-level tests cover every byte: tests/agent/persist/test_checkpoint.py
``test_damaged_newest_falls_back_to_the_previous_with_a_warning``, test_wal.py
``test_a_bit_flip_in_the_file_never_yields_a_wrong_record``,
``test_any_truncation_of_the_file_yields_a_prefix``, test_state.py
``test_corrupt_log_record_keeps_the_prefix_and_reports``; tests/agent/test_bundle*.py for
bundles): here the daemon itself meets a flipped byte or a truncation in the newest
checkpoint, the newest log segment and a bundle file, and the run records its message,
whether it serves, and what the state holds afterwards.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import time
from pathlib import Path

from agent.bench.chaos_rig import (
    Harness,
    WalArchive,
    audit,
    daemon_env,
    sigkill,
    start_daemon,
)
from agent.errors import ReverieError

TMPFS_SIZE = "32m"
LEARN_WAIT_S = 30.0


def _learned(h: Harness, ids: list[str], timeout_s: float = LEARN_WAIT_S) -> bool:
    return h.wait(lambda: all(i in h.label_events for i in ids), timeout_s)


def _reply(h: Harness, n0: int, timeout_s: float = 20.0) -> dict | None:
    if h.wait(lambda: len(h.replies) > n0, timeout_s):
        return h.replies[n0][1]
    return None


def _fill(path: Path) -> int:
    """Write `path` until the file system is full; returns the bytes written."""
    n = 0
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 4096, 64, 1):
            block = b"\0" * chunk
            while True:
                try:
                    f.write(block)
                    n += chunk
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return n


def disk_full(bundle: Path, url: str, workdir: Path, *, window: int, channels: int,
              seed: int) -> dict:
    mnt = workdir / "tmpfs"
    mnt.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700",
                          "tmpfs", str(mnt)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"skipped": f"cannot mount a tmpfs: {out.stderr.strip() or out.returncode}"}
    try:
        return _disk_full(bundle, url, workdir, mnt, window, channels, seed)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _disk_full(bundle, url, workdir, mnt, window, channels, seed) -> dict:
    device = "chaos-disk"
    state = mnt / "state"
    env = daemon_env(state, checkpoint_interval_s=3600, broker_client_id="chaos-disk")
    archive = WalArchive(state / "wal", mnt / "wal-archive").start()
    h = Harness(url, device, window, channels, seed)
    result: dict = {"method": f"tmpfs size={TMPFS_SIZE}"}
    daemon, _took = start_daemon(bundle, url, device, workdir, env)
    try:
        before = [f"B{i:03d}" for i in range(20)]
        for i, lid in enumerate(before):
            h.label(lid, ("tap", "swipe")[i % 2])
        result["learned_before"] = _learned(h, before)
        n0 = len(h.replies)
        h.command("snapshot")
        result["snapshot_before"] = bool((_reply(h, n0) or {}).get("ok"))
        result["filler_bytes"] = _fill(mnt / "filler")
        t_full = time.monotonic()
        n_ev = len(h.events)
        during = [f"F{i:03d}" for i in range(30)]
        for i, lid in enumerate(during):
            h.label(lid, ("tap", "swipe")[i % 2])
        for _ in range(20):
            h.frame()
        h.wait(lambda: any(e.get("reason") == "learn_failed" for _t, e in h.events[n_ev:]),
               LEARN_WAIT_S)
        errors = [e for _t, e in h.events[n_ev:] if e.get("reason") == "learn_failed"]
        result["learn_failed_events"] = len(errors)
        result["learn_failed_example"] = errors[0]["detail"] if errors else None
        result["learned_while_full"] = sum(i in h.label_events for i in during)
        n0 = len(h.replies)
        h.command("snapshot")
        reply = _reply(h, n0) or {}
        result["snapshot_while_full"] = {"ok": reply.get("ok"), "error": reply.get("error")}
        result["predictions_while_full"] = h.predictions_after(t_full)
        result["last_good_state"] = _load_copy(bundle, state, workdir / "disk-copy", device,
                                               before, during)
        (mnt / "filler").unlink()
        t_free = time.monotonic()
        result["learned_after_space_returned"] = _learned(h, during)
        result["relearn_s"] = time.monotonic() - t_free
        n0 = len(h.replies)
        h.command("snapshot")
        result["snapshot_after"] = bool((_reply(h, n0) or {}).get("ok"))
        daemon.close()
        accepted = [f"{device}/{i}" for i in h.accepted()]
        result["audit"] = audit(bundle, state, archive, accepted)
        result["ok"] = bool(result["learn_failed_events"] and result["learned_after_space_returned"]
                            and not result["audit"]["missing"]
                            and not result["audit"]["duplicated"]
                            and result["last_good_state"]["loads"]
                            and result["predictions_while_full"] > 0)
    finally:
        daemon.close()
        h.close()
        archive.stop()
    return result


def _load_copy(bundle: Path, state: Path, copy: Path, device: str, before: list[str],
               during: list[str]) -> dict:
    """Load a copy of a live state directory: what a power cut right now would leave."""
    from agent.learner import Learner

    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(state, copy)
    (copy / "LOCK").unlink(missing_ok=True)
    try:
        with Learner.from_bundle(bundle, state_dir=copy) as learner:
            return {"loads": True,
                    "labels_before_held": sum(learner.seen(f"{device}/{i}") for i in before),
                    "labels_during_held": sum(learner.seen(f"{device}/{i}") for i in during),
                    "warnings": learner.recovery_warnings}
    except ReverieError as exc:
        return {"loads": False, "error": str(exc)}
    finally:
        shutil.rmtree(copy, ignore_errors=True)


# ---------------------------------------------------------------------- damage


def _flip(path: Path, at: float = 0.5) -> str:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0x40
    path.write_bytes(bytes(data))
    return f"flipped bit 6 of byte {i} of {path.name} ({len(data)} bytes)"


def _truncate(path: Path, at: float = 0.5) -> str:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * at))
    return f"truncated {path.name} from {size} to {int(size * at)} bytes"


def _newest_checkpoint_file(state: Path) -> Path:
    newest = sorted(p for p in (state / "checkpoints").iterdir() if p.name.isdigit())[-1]
    return max((p for p in newest.iterdir() if p.suffix == ".npy"), key=lambda p: p.stat().st_size)


def _newest_segment(state: Path) -> Path:
    return sorted((state / "wal").glob("wal-*.log"))[-1]


def damage(bundle: Path, url: str, workdir: Path, *, window: int, channels: int,
           seed: int) -> list[dict]:
    """A state with three checkpoints and log records after the newest (the daemon
    SIGKILLed), then one daemon start per kind of damage on a copy of it."""
    device = "chaos-damage"
    base = workdir / "damage-state"
    env = daemon_env(base, checkpoint_interval_s=3600, broker_client_id="chaos-damage")
    h = Harness(url, device, window, channels, seed)
    ids: list[str] = []
    try:
        daemon, _took = start_daemon(bundle, url, device, workdir, env)
        try:
            for part in range(4):
                batch = [f"D{part}{i:02d}" for i in range(10)]
                for i, lid in enumerate(batch):
                    h.label(lid, ("tap", "swipe")[i % 2])
                ids += batch
                if not _learned(h, batch):
                    raise ReverieError(f"labels {batch[0]}.. not learned{daemon._tail()}")
                if part < 3:
                    n0 = len(h.replies)
                    h.command("snapshot")
                    _reply(h, n0)
        finally:
            sigkill(daemon)
    finally:
        h.close()
    bad_bundle = workdir / "damaged-bundle"
    cases = [("checkpoint bit flip", lambda s: _flip(_newest_checkpoint_file(s)), bundle),
             ("checkpoint truncated", lambda s: _truncate(_newest_checkpoint_file(s)), bundle),
             ("log bit flip", lambda s: _flip(_newest_segment(s), 0.6), bundle),
             ("log truncated", lambda s: _truncate(_newest_segment(s), 0.6), bundle),
             ("bundle bit flip", lambda s: _flip(bad_bundle / "head.npz"), bad_bundle)]
    rows = []
    for name, hurt, use_bundle in cases:
        copy = workdir / "damage-copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(base, copy)
        shutil.rmtree(bad_bundle, ignore_errors=True)
        shutil.copytree(bundle, bad_bundle)
        what = hurt(copy)
        rows.append({"case": name, "damage": what,
                     **_start_on(use_bundle, bundle, url, device, workdir, copy, ids)})
    return rows


def _start_on(use_bundle: Path, good_bundle: Path, url: str, device: str, workdir: Path,
              state: Path, ids: list[str]) -> dict:
    """Start the daemon on a damaged copy; its message, whether it serves, what is kept."""
    from agent.learner import Learner

    env = daemon_env(state, checkpoint_interval_s=3600, broker_client_id="chaos-damage")
    row: dict = {}
    try:
        daemon, _took = start_daemon(use_bundle, url, device, workdir, env, timeout_s=30)
    except ReverieError as exc:
        row.update(serves=False, message=_message(str(exc)))
        daemon = None
    if daemon is not None:
        log = daemon.stderr_path.read_text(errors="replace")
        daemon.close()
        row.update(serves=True, message=_message(log))
    try:
        with Learner.from_bundle(good_bundle, state_dir=state) as learner:
            row["labels_held"] = sum(learner.seen(f"{device}/{i}") for i in ids)
    except ReverieError as exc:
        row["labels_held"] = None
        row["load_error"] = str(exc)
    row["labels_total"] = len(ids)
    return row


def _message(text: str) -> str | None:
    """The first line of a log or error text that reports damage."""
    words = ("recovery", "corrupt", "damaged", "torn", "sha256", "hash", "mismatch",
             "Error", "error")
    for line in text.splitlines():
        if any(w in line for w in words):
            return line.strip()[:400]
    return None
