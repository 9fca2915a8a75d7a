"""The crash campaign of ``reverie bench chaos``: SIGKILL the daemon N times under a live
stream, restart it, and prove nothing learned was lost, duplicated or corrupted.

Throughout the campaign (the daemon up or down) a harness thread publishes frames
(QoS 0, ``frame_rate`` windows/s) and labels (QoS 1, ``label_rate``/s, each window
inline, classes alternating); labels published while the daemon is down wait in its
persistent session. Each cycle starts ``reverie run`` on the same state directory
(``checkpoint.interval_s`` small, so background checkpoints happen between kills), times
spawn -> connected, waits for predictions to resume, then kills at a moment drawn from:

* ``stream``: uniform in [0.2, 2] s of the running stream;
* ``append``: just after a burst of labels (uniform 0-50 ms: mid log append);
* ``checkpoint``: just after a ``snapshot`` command (uniform 0-250 ms: mid checkpoint);
* ``sleep``: after a ``sleep`` command, once its "sleep started" event arrived (uniform
  0-1.5 s into the consolidation and its checkpoint).

After each kill, before the restart: what the kill interrupted (a ``.tmp-`` checkpoint
directory, a torn log tail) and whether a copy of the state recovers under
``strict=True`` (anything but a torn tail is damage: counted as a corrupt state). At the
end a sentinel label (labels are delivered in order) drains the session, the daemon
stops cleanly and `chaos_rig.audit` judges the state: every label the broker accepted
is learned, exactly once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from agent.bench.chaos_rig import (
    Harness,
    WalArchive,
    audit,
    check_files,
    daemon_env,
    sigkill,
    start_daemon,
)
from agent.bench.cli import percentiles, say

MODES = ("stream", "append", "checkpoint", "sleep")
MODE_WEIGHTS = (0.4, 0.2, 0.25, 0.15)
CLASSES = ("tap", "swipe")
RESUME_TIMEOUT_S = 30.0


class _Stream(threading.Thread):
    """Frames and labels at fixed rates until stopped; label ids L000000, L000001, ..."""

    def __init__(self, harness: Harness, frame_rate: float, label_rate: float):
        super().__init__(name="chaos-stream", daemon=True)
        self.h, self.frame_rate, self.label_rate = harness, frame_rate, label_rate
        self.n_labels = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def burst(self, n: int) -> None:
        for _ in range(n):
            self.next_label()

    def next_label(self) -> None:
        with self._lock:
            i = self.n_labels
            self.n_labels += 1
        self.h.label(f"L{i:06d}", CLASSES[i % 2])

    def run(self) -> None:
        t0, frames, labels = time.monotonic(), 0, 0
        while not self._halt.is_set():
            elapsed = time.monotonic() - t0
            while frames < elapsed * self.frame_rate:
                self.h.frame()
                frames += 1
            while labels < elapsed * self.label_rate:
                self.next_label()
                labels += 1
            self._halt.wait(0.01)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def crash_campaign(bundle: Path, url: str, workdir: Path, *, cycles: int, seed: int,
                   window: int, channels: int, frame_rate: float = 20.0,
                   label_rate: float = 10.0, checkpoint_interval_s: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    device = "chaos-crash"
    state = workdir / "crash-state"
    env = daemon_env(state, checkpoint_interval_s=checkpoint_interval_s, sleep_budget_s=5)
    archive = WalArchive(state / "wal", workdir / "crash-wal-archive").start()
    harness = Harness(url, device, window, channels, seed)
    stream = _Stream(harness, frame_rate, label_rate)
    restart_s: list[float] = []
    kills = {m: 0 for m in MODES}
    evidence = {"mid_checkpoint": 0, "torn_tail": 0, "sleep_started": 0}
    corrupt: list[dict] = []
    stalled: list[int] = []
    warnings: list[str] = []
    t_start = time.monotonic()
    try:
        for cycle in range(cycles):
            daemon, took = start_daemon(bundle, url, device, workdir, env)
            restart_s.append(took)
            if cycle == 0:      # labels before the first connect would have no session
                stream.start()
            t_up = time.monotonic()
            if not harness.wait(lambda t=t_up: harness.predictions_after(t) > 0,
                                RESUME_TIMEOUT_S):
                stalled.append(cycle)
            mode = str(rng.choice(MODES, p=MODE_WEIGHTS))
            kills[mode] += 1
            if mode == "stream":
                time.sleep(rng.uniform(0.2, 2.0))
            elif mode == "append":
                stream.burst(int(rng.integers(5, 30)))
                time.sleep(rng.uniform(0.0, 0.05))
            elif mode == "checkpoint":
                harness.command("snapshot")
                time.sleep(rng.uniform(0.0, 0.25))
            else:
                n0 = len(harness.events)
                harness.command("sleep", budget_s=5)
                if harness.wait(lambda n0=n0: any(e.get("type") == "sleep"
                                                  for _t, e in harness.events[n0:]), 10.0):
                    evidence["sleep_started"] += 1
                time.sleep(rng.uniform(0.0, 1.5))
            sigkill(daemon)
            found = check_files(state, workdir / "crash-scratch")
            evidence["mid_checkpoint"] += found["mid_checkpoint"]
            evidence["torn_tail"] += found["torn_tail"]
            warnings += found["warnings"]
            if found["error"]:
                corrupt.append({"cycle": cycle, "mode": mode, "error": found["error"]})
            if (cycle + 1) % 10 == 0 or cycle + 1 == cycles:
                say("chaos", f"crash: {cycle + 1}/{cycles} cycles, {stream.n_labels} labels, "
                     f"{len(corrupt)} corrupt, restart p50 {np.median(restart_s):.2f} s")
        # drain: a sentinel after everything else, then a clean stop
        stream.stop()
        daemon, took = start_daemon(bundle, url, device, workdir, env)
        restart_s.append(took)
        sentinel = f"L{stream.n_labels:06d}"
        stream.next_label()
        ok = harness.wait(lambda: sentinel in harness.label_events, 60.0)
        daemon.close()           # SIGTERM: a clean stop
        accepted = harness.accepted()
        acked = [i for i in accepted if i in harness.label_events]
        verdict = audit(bundle, state, archive, [f"{device}/{i}" for i in accepted])
    finally:
        stream.stop()
        harness.close()
    recovered = _recovered(harness, accepted, verdict)
    pct = percentiles(restart_s, (50, 99))
    return {"cycles": cycles, "seed": seed, "seconds": time.monotonic() - t_start,
            "kills_by_mode": kills, "evidence": evidence,
            "labels_sent": len(harness.labels), "labels_accepted": len(accepted),
            "labels_acknowledged": len(acked), "labels_recovered": recovered,
            "labels_lost": len(verdict["missing"]), "labels_duplicated": len(verdict["duplicated"]),
            "corrupt_states": len(corrupt), "corrupt": corrupt[:20],
            "predictions_stalled": stalled, "sentinel_learned": ok,
            "restart_p50_s": pct["p50_us"] / 1e6, "restart_p99_s": pct["p99_us"] / 1e6,
            "restart_max_s": max(restart_s),
            "recovery_warnings": _kinds(warnings), "audit": _short(verdict)}


def _recovered(harness: Harness, accepted: list[str], verdict: dict) -> int:
    """Labels a kill interrupted that the restarted state still holds: learned by a
    process killed before its "label" event went out (no event ever: acknowledged, then
    recovered from the log) or before its acknowledgement (redelivered by the broker and
    recognised: a "duplicate" event)."""
    missing = set(verdict["missing"])
    return sum(1 for i in accepted if i not in missing
               and harness.label_events.get(i, "duplicate") == "duplicate")


def _kinds(warnings: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for w in warnings:
        kind = "torn_tail" if "torn" in w else "leftover" if ".tmp-" in w else "other"
        out[kind] = out.get(kind, 0) + 1
    return out


def _short(verdict: dict) -> dict:
    v = dict(verdict)
    v["missing"] = v["missing"][:20]
    v["duplicated"] = v["duplicated"][:20]
    v["recovery_warnings"] = v["recovery_warnings"][:5]
    return v


