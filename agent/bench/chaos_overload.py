"""Overload of ``reverie bench chaos``: 10x the nominal frame rate, then back to nominal.

Reuses the e2e bench's phases (agent/bench/e2e/phases.py): `latency` paces whole-window
frames from a publisher process and matches predictions by (device, seq), here at the
nominal rate (before), at ten times it for ``seconds`` (during) and at the nominal rate
again (after: "latency recovers"). During the overload a sampler reads the daemon's
``reverie_queue_depth`` gauge (/metrics) and VmRSS (/proc) every 0.5 s: the queue must
stay within ``ingest.queue_size`` and RSS growth (max during - at its start) within the
target; drops are the daemon's counters by reason (``queue_full`` ...) plus frames it
never received.
"""

from __future__ import annotations

import threading
from pathlib import Path

from agent.bench.chaos_rig import PREFIX, daemon_env, start_daemon
from agent.bench.e2e.phases import QUEUE, Target, latency
from agent.bench.e2e.procs import status_kb

SAMPLE_S = 0.5
QUEUE_SIZE = 4096          # the daemon's default ingest.queue_size


class _Sampler(threading.Thread):
    def __init__(self, t: Target):
        super().__init__(name="chaos-sampler", daemon=True)
        self.t = t
        self.queue: list[float] = []
        self.rss_mb: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(SAMPLE_S):
            try:
                self.queue.append(self.t.daemon.scrape().get(QUEUE, 0.0))
            except OSError:
                pass
            self.rss_mb.append(status_kb(self.t.daemon.pid, "VmRSS") / 1024)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def overload(bundle: Path, url: str, workdir: Path, *, window: int, channels: int,
             nominal_rate: float, factor: float, seconds: float, calm_s: float) -> dict:
    device = "chaos-load"
    env = daemon_env(workdir / "overload-state", broker_client_id="chaos-load",
                     ingest_queue_size=QUEUE_SIZE)
    daemon, _took = start_daemon(bundle, url, device, workdir, env)
    with Target(daemon, url, PREFIX, [device], window, channels, workdir) as t:
        t.warm_up()
        before = latency(t, nominal_rate, calm_s)
        rss0 = status_kb(daemon.pid, "VmRSS") / 1024
        sampler = _Sampler(t)
        sampler.start()
        try:
            during = latency(t, nominal_rate * factor, seconds)
        finally:
            sampler.stop()
        rss_end = status_kb(daemon.pid, "VmRSS") / 1024
        after = latency(t, nominal_rate, calm_s)
    rss_max = max(sampler.rss_mb or [rss_end])
    return {"nominal_rate": nominal_rate, "factor": factor, "seconds": seconds,
            "queue_size": QUEUE_SIZE, "queue_depth_max": max(sampler.queue or [0.0]),
            "rss_start_mb": rss0, "rss_max_mb": rss_max, "rss_end_mb": rss_end,
            "rss_growth_mb": rss_max - rss0,
            "phases": [{"phase": name, **row} for name, row in
                       (("before", before), ("during", during), ("after", after))]}
