"""The measured phases of ``reverie bench e2e``; each returns one row of the report.

Rates come from the two ends of the same interval: the raw ceiling from the counting
subscriber's (t, n) samples, the daemon's from two /metrics scrapes inside the flood. A
flood's first 20 % (at most 1 s: connection set-up, queues filling) is left out of the
rate. Counters are diffed per phase; a phase ends only when the daemon has drained (its
queue is empty and its counters stopped moving), so one phase never leaks into the next.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from agent.bench.cli import percentiles
from agent.bench.e2e.procs import Child, DaemonProcess, system_busy
from agent.errors import ReverieError

LOAD = [sys.executable, "-m", "agent.bench.e2e.load"]
DRAIN_TIMEOUT_S = 120.0     # after a flood the broker may still hold ~100k frames for it
WARM_RATE = 200.0
WARM_S = 0.5
PACING_TOLERANCE = 0.95      # an achieved rate below 95 % of the target is flagged

FRAMES_IN = 'reverie_messages_received_total{kind="frames"}'
FRAMES = "reverie_frames_total"
WINDOWS = "reverie_windows_total"
PREDICTIONS = "reverie_predictions_total"
QUEUE = "reverie_queue_depth"
DROPPED = "reverie_dropped_total{reason="
OUTBOX_DROPPED = "reverie_outbox_dropped_total"


def _steady_start(t_first: float, span_s: float) -> float:
    return t_first + min(1.0, 0.2 * span_s)


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def _subscriber(url: str, topic: str, mode: str, out: Path) -> Child:
    sub = Child([*LOAD, "sub", "--url", url, "--topic", topic, "--mode", mode,
                 "--out", str(out)], name=f"subscriber ({mode})",
                stderr_path=out.with_suffix(".err"))
    try:
        sub.expect("ready")
    except ReverieError:
        sub.close()
        raise
    return sub


def _end_subscriber(sub: Child) -> None:
    sub.close_stdin()
    sub.expect("done")
    sub.wait(30)


def _publisher(url: str, prefix: str, devices: list[str], samples: int, channels: int, *,
               rate: float, seconds: float, round_size: int, seq0: int, workdir: Path,
               times: Path | None = None) -> Child:
    argv = [*LOAD, "pub", "--url", url, "--prefix", prefix, "--devices", ",".join(devices),
            "--samples", str(samples), "--channels", str(channels), "--rate", str(rate),
            "--seconds", str(seconds), "--round", str(round_size), "--seq0", str(seq0)]
    if times is not None:
        argv += ["--times", str(times)]
    return Child(argv, name="publisher", stderr_path=workdir / "publisher.err")


def _end_publisher(pub: Child) -> dict:
    summary = json.loads(pub.expect("{"))
    pub.wait(30)
    return summary


def delta(m0: dict, m1: dict, key: str) -> float:
    return m1.get(key, 0.0) - m0.get(key, 0.0)


def drops(m0: dict, m1: dict, sent: int) -> dict[str, int]:
    """What was lost between two scrapes, by where: the daemon's drop reasons, its full
    outbox, and frames the daemon never received (``not_received``: lost in the broker
    or still in flight at the end)."""
    out = {k[len(DROPPED):-1].strip('"'): int(delta(m0, m1, k)) for k in m1
           if k.startswith(DROPPED) and delta(m0, m1, k) > 0}
    if delta(m0, m1, OUTBOX_DROPPED) > 0:
        out["outbox_full"] = int(delta(m0, m1, OUTBOX_DROPPED))
    not_received = sent - int(delta(m0, m1, FRAMES_IN))
    if not_received > 0:
        out["not_received"] = not_received
    return out


class Target:
    """The daemon under test, the devices it serves and each device's next frame seq."""

    def __init__(self, daemon: DaemonProcess, url: str, prefix: str, devices: list[str],
                 window: int, channels: int, workdir: Path):
        self.daemon, self.url, self.prefix, self.devices = daemon, url, prefix, devices
        self.window, self.channels, self.workdir = window, channels, workdir
        self.seq = 0                              # every device is at the same seq
        self.rss_at_start_mb = daemon.memory_mb()["rss_mb"]

    @classmethod
    def start(cls, bundle: Path, url: str, prefix: str, devices: list[str], window: int,
              channels: int, workdir: Path, *, gateway: bool = False) -> Target:
        daemon = DaemonProcess(bundle, url, "+" if gateway else devices[0], prefix, workdir)
        try:
            daemon.wait_serving()
            return cls(daemon, url, prefix, devices, window, channels, workdir)
        except BaseException:
            daemon.close()
            raise

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc) -> None:
        self.daemon.close()

    def publish(self, *, samples: int, rate: float, seconds: float,
                times: Path | None = None) -> Child:
        """Start a publisher: whole windows for every device, seqs continuing ours."""
        return _publisher(self.url, self.prefix, self.devices, samples, self.channels,
                          rate=rate, seconds=seconds, seq0=self.seq, workdir=self.workdir,
                          round_size=len(self.devices) * (self.window // samples), times=times)

    def finish(self, pub: Child) -> dict:
        summary = _end_publisher(pub)
        self.seq = summary["seq_next"]
        return summary

    def scrape(self) -> tuple[float, dict]:
        """(monotonic time of the scrape, its counters)."""
        t0 = time.monotonic()
        m = self.daemon.scrape()
        return (t0 + time.monotonic()) / 2, m

    def drained(self) -> dict:
        """Scrape until the queue is empty and the counters stopped moving; a daemon still
        busy after DRAIN_TIMEOUT_S would leak one phase into the next: ReverieError."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        last: dict | None = None
        while True:
            _t, m = self.scrape()
            still = last is not None and all(m.get(k) == last.get(k)
                                              for k in (FRAMES_IN, PREDICTIONS))
            if still and m.get(QUEUE, 0.0) == 0:
                return m
            if time.monotonic() > deadline:
                raise ReverieError(f"{self.daemon.name} still busy {DRAIN_TIMEOUT_S:g} s after "
                                   f"the load stopped (queue depth {m.get(QUEUE)})")
            last = m
            time.sleep(0.2)

    def warm_up(self, attempts: int = 20) -> None:
        """Paced windows until two rounds in a row are predicted in full (subscription in
        place, onnxruntime and numba warm)."""
        served = 0
        for _ in range(attempts):
            _t, m0 = self.scrape()
            sent = self.finish(self.publish(samples=self.window, rate=WARM_RATE,
                                            seconds=WARM_S))["sent"]
            served = served + 1 if delta(m0, self.drained(), PREDICTIONS) >= sent else 0
            if served >= 2:
                return
        raise ReverieError(f"{self.daemon.name} did not predict every warm-up window in "
                           f"{attempts} attempts{self.daemon._tail()}")


def raw_ceiling(url: str, prefix: str, samples: int, channels: int, seconds: float,
                workdir: Path) -> dict:
    """Messages/s a paho subscriber with a counting callback receives under a flood."""
    out = workdir / f"ceiling-{samples}.npz"
    sub = _subscriber(url, f"{prefix}/ceiling/frames", "count", out)
    with sub:
        with _publisher(url, prefix, ["ceiling"], samples, channels, rate=0, seconds=seconds,
                        round_size=1, seq0=0, workdir=workdir) as pub:
            summary = _end_publisher(pub)
        time.sleep(0.5)                        # what the broker still holds for us
        _end_subscriber(sub)
    tn = np.load(out, allow_pickle=False)["samples"]   # (n, 2): monotonic t, messages so far
    t2 = summary["t_last"]
    t1 = _steady_start(summary["t_first"], t2 - summary["t_first"])
    n1, n2 = np.interp([t1, t2], tn[:, 0], tn[:, 1])
    received = int(tn[-1, 1]) if len(tn) else 0
    return {"frame_samples": samples, "sent": summary["sent"], "sent_per_s": summary["rate"],
            "received": received, "received_per_s": float((n2 - n1) / (t2 - t1)),
            "lost": summary["sent"] - received}


def sustained_ingest(t: Target, samples: int, seconds: float) -> dict:
    """The daemon's frames/s and windows/s under a flood of `samples`-sample frames."""
    _t, m0 = t.scrape()
    pub = t.publish(samples=samples, rate=0, seconds=seconds)
    start = float(pub.expect("start").split()[1])
    _sleep_until(_steady_start(start, seconds))
    t1, m1 = t.scrape()
    _sleep_until(start + seconds)
    t2, m2 = t.scrape()
    summary = t.finish(pub)
    m3 = t.drained()
    span = t2 - t1
    return {"frame_samples": samples, "frames_per_window": t.window // samples,
            "sent": summary["sent"], "sent_per_s": summary["rate"],
            "frames_per_s": delta(m1, m2, FRAMES) / span,
            "windows_per_s": delta(m1, m2, WINDOWS) / span,
            "predictions_per_s": delta(m1, m2, PREDICTIONS) / span,
            "frames": int(delta(m0, m3, FRAMES)), "windows": int(delta(m0, m3, WINDOWS)),
            "dropped": drops(m0, m3, summary["sent"])}


def latency(t: Target, rate: float, seconds: float) -> dict:
    """Frame published -> prediction received at `rate` windows/s over every device."""
    n = len(t.devices)
    out = t.workdir / f"predictions-{n}-{rate:g}.npz"
    times = t.workdir / f"published-{n}-{rate:g}.npy"
    seq0 = t.seq
    with _subscriber(t.url, f"{t.prefix}/+/predictions", "predictions", out) as sub:
        _t, m0 = t.scrape()
        summary = t.finish(t.publish(samples=t.window, rate=rate, seconds=seconds, times=times))
        m1 = t.drained()
        _end_subscriber(sub)
    rec, t_pub = np.load(out, allow_pickle=False), np.load(times, allow_pickle=False)
    index = {d: k for k, d in enumerate(t.devices)}
    dev = np.array([index.get(str(d), -1) for d in rec["device"]], np.int64)
    i = (rec["seq_last"] - seq0) * n + dev      # the publisher's message number
    ok = (dev >= 0) & (i >= 0) & (i < len(t_pub))
    i, first = np.unique(i[ok], return_index=True)
    lat_s = rec["t"][ok][first] - t_pub[i]
    own = rec["latency_ms"][ok][first] / 1e3
    achieved = summary["rate"] or 0.0
    row = {"devices": n, "target_rate": rate, "achieved_rate": achieved,
           "pacing_ok": achieved >= PACING_TOLERANCE * rate, "sent": summary["sent"],
           "received": int(len(i)), "lost": summary["sent"] - int(len(i)),
           "dropped": drops(m0, m1, summary["sent"])}
    for name, samples in (("", lat_s), ("daemon_", own)):
        if len(samples):
            us = percentiles(samples, (50, 99, 100))
            row.update({f"{name}p50_ms": us["p50_us"] / 1e3, f"{name}p99_ms": us["p99_us"] / 1e3,
                        f"{name}max_ms": us["p100_us"] / 1e3})
        else:
            row.update({f"{name}p50_ms": None, f"{name}p99_ms": None, f"{name}max_ms": None})
    return row


def idle_cpu(t: Target, seconds: float) -> dict:
    """The daemon's CPU (% of one core) with no traffic, and its RSS then."""
    time.sleep(1.0)                             # the warm-up's last publishes settle
    mem = t.daemon.memory_mb()
    c0, b0, w0 = t.daemon.cpu_seconds(), system_busy(), time.monotonic()
    time.sleep(seconds)
    c1, b1, w1 = t.daemon.cpu_seconds(), system_busy(), time.monotonic()
    return {"seconds": w1 - w0, "cpu_pct": 100 * (c1 - c0) / (w1 - w0),
            "machine_busy_pct": 100 * (b1[0] - b0[0]) / max(b1[1] - b0[1], 1.0),
            "rss_at_start_mb": t.rss_at_start_mb, **mem}
