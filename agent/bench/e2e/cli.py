"""``reverie bench e2e``: the daemon end to end over a real broker, in one run.

One private mosquitto (procs.py), every party in a process of its own (load.py), in
this order:

1. raw ceiling (the baseline): a paho subscriber whose callback only counts, while a
   publisher floods binary frames (QoS 0) of one window each, then of a quarter window;
   messages/s received over the steady part of the flood;
2. ``reverie run`` serving one device starts and is warmed up; its idle CPU (utime +
   stime from /proc over ``--idle-seconds`` without traffic) and RSS;
3. latency, frame published -> prediction received, at paced rates: the publisher
   records each publish time, a subscriber each receipt time (CLOCK_MONOTONIC is
   system-wide, so they compare), matched by (device, seq_last); achieved rate, losses,
   p50/p99;
4. sustained ingest: the raw-ceiling flood into the daemon (after the paced runs, so a
   flood's aftermath cannot touch them); frames/s and windows/s it processed (its
   /metrics counters, read at two instants inside the flood), its drops by reason, and
   frames/s as % of the raw ceiling for the same frame size; its RSS after the load;
5. a second daemon in gateway mode (``--device-id +``), N devices round robin: latency
   as in 3, and its RSS after the load.

Two cores shared by broker, daemon and load (and whatever else runs): the figures are
what this machine gives at the time; the JSON records the machine load beside them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.bench.cli import (
    command_line,
    environment,
    flat,
    print_table,
    print_verdicts,
    say,
    write_json,
)

TARGET_INGEST_PCT = 50.0
TARGET_P99_MS = 5.0
TARGET_P99_RATE = 2000.0
TARGET_IDLE_CPU_PCT = 1.0
PREFIX = "reverie/bench"


@dataclass(frozen=True)
class Plan:
    seconds: float = 5.0                             # per flood and per paced rate
    idle_s: float = 20.0
    rates: tuple[float, ...] = (200.0, 500.0, 1000.0, 2000.0)   # windows/s
    gateway_devices: int = 100
    quarter_frames: bool = True                      # also frames of 1/4 window

    def __post_init__(self) -> None:
        from agent.errors import ConfigError

        for name in ("seconds", "idle_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}, expected a number > 0")
        if not self.rates or min(self.rates) <= 0:
            raise ConfigError(f"rates={self.rates!r}, expected one or more rates > 0")
        if not 1 <= self.gateway_devices <= 1000:
            raise ConfigError(f"devices={self.gateway_devices!r}, expected 1..1000 "
                              "(the daemon's default ingest.max_devices)")

    @classmethod
    def quick(cls) -> Plan:
        return cls(seconds=1.0, idle_s=1.0, rates=(50.0, 100.0), gateway_devices=5,
                   quarter_frames=False)


def register(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("e2e", help="daemon end to end over a private mosquitto: raw "
                             "ceiling, sustained ingest, latency, idle CPU, RSS",
                             description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="bundle to serve (default: the demo's "
                   "6-channel bundle, trained once through `export` and cached)")
    p.add_argument("--cache-dir", default=os.environ.get("REVERIE_DEMO_CACHE", ".reverie/demo"),
                   help="where the demo bundle is cached (default .reverie/demo)")
    p.add_argument("--seconds", type=float, default=None,
                   help="length of each flood and each paced rate (default 5)")
    p.add_argument("--idle-seconds", type=float, default=None, help="idle CPU window (default 20)")
    p.add_argument("--rates", default=None, help="paced windows/s, comma-separated "
                   "(default 200,500,1000,2000)")
    p.add_argument("--devices", type=int, default=None, help="devices in the gateway run "
                   "(default 100)")
    p.add_argument("--quick", action="store_true", help="a smoke run (about 30 s): 1 s "
                   "phases, 50 and 100 windows/s, 5 gateway devices, no quarter frames")
    p.add_argument("--json", default=None, help="write the results here")
    p.set_defaults(func=cmd_e2e)


def plan_from_args(args: argparse.Namespace) -> Plan:
    from agent.errors import ConfigError

    plan = Plan.quick() if args.quick else Plan()
    changes: dict[str, object] = {}
    if args.seconds is not None:
        changes["seconds"] = args.seconds
    if args.idle_seconds is not None:
        changes["idle_s"] = args.idle_seconds
    if args.devices is not None:
        changes["gateway_devices"] = args.devices
    if args.rates is not None:
        try:
            changes["rates"] = tuple(float(r) for r in args.rates.split(",") if r.strip())
        except ValueError:
            raise ConfigError(f"--rates {args.rates!r}: expected numbers separated by commas, "
                              "e.g. 200,500") from None
    return Plan(**{**asdict(plan), **changes})


def cmd_e2e(args: argparse.Namespace) -> int:
    from agent.bench.e2e import procs
    from agent.bench.e2e.phases import Target, idle_cpu, latency, raw_ceiling, sustained_ingest
    from agent.bundle import load_bundle

    plan = plan_from_args(args)
    # SIGTERM unwinds like Ctrl-C, so the daemons and the broker we started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bundle_dir = Path(args.bundle) if args.bundle else procs.demo_bundle(Path(args.cache_dir))
    bundle = load_bundle(bundle_dir)
    window, channels = bundle.input.window_samples, bundle.input.n_channels
    frame_sizes = [window] + ([window // 4] if plan.quarter_frames and window % 4 == 0 else [])
    result: dict = {"bench": "e2e", "environment": environment(), "command": command_line(),
                    "plan": asdict(plan), "bundle": bundle.bundle_id,
                    "window": [channels, window], "load_before": os.getloadavg()}
    busy0 = procs.system_busy()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reverie-e2e-")))
        broker, url = procs.start_broker(tmp)
        stack.callback(broker.close)
        say("e2e", f"private mosquitto on {url}; bundle {bundle.bundle_id} ({channels}x{window})")
        result["raw_ceiling"] = [raw_ceiling(url, PREFIX, fs, channels, plan.seconds, tmp)
                                 for fs in frame_sizes]
        say("e2e", "raw ceiling done; starting the daemon (one device)")
        one = Target.start(bundle_dir, url, PREFIX, ["bench-000"], window, channels, tmp)
        with one:
            one.warm_up()
            result["idle"] = idle_cpu(one, plan.idle_s)
            lat = [latency(one, rate, plan.seconds) for rate in plan.rates]
            ingest = [sustained_ingest(one, fs, plan.seconds) for fs in frame_sizes]
            for row, ceiling in zip(ingest, result["raw_ceiling"], strict=True):
                row["pct_of_ceiling"] = 100 * row["frames_per_s"] / ceiling["received_per_s"]
            result["ingest"] = ingest
            result["idle"]["after_load"] = one.daemon.memory_mb()
        say("e2e", f"starting the daemon in gateway mode ({plan.gateway_devices} devices)")
        devices = [f"bench-{k:03d}" for k in range(plan.gateway_devices)]
        gw = Target.start(bundle_dir, url, PREFIX, devices, window, channels, tmp, gateway=True)
        with gw:
            gw.warm_up()
            lat += [latency(gw, rate, plan.seconds) for rate in plan.rates]
            result["gateway_after_load"] = gw.daemon.memory_mb()
        result["latency"] = lat
    busy1 = procs.system_busy()
    result["machine_busy_pct"] = 100 * (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1)
    result["load_after"] = os.getloadavg()
    result["targets"] = targets(result)
    report(result)
    write_json(args.json, result)
    return 0






def targets(result: dict) -> list[dict]:
    """The issue's targets against this run's figures; ``met`` is None if not measured."""
    out = []
    full = result["ingest"][0]
    out.append({"target": f"sustained ingest >= {TARGET_INGEST_PCT:g} % of the raw ceiling "
                f"({full['frame_samples']}-sample frames)",
                "value": round(full["pct_of_ceiling"], 1),
                "met": full["pct_of_ceiling"] >= TARGET_INGEST_PCT})
    for n in sorted({r["devices"] for r in result["latency"]}):
        rows = [r for r in result["latency"]
                if r["devices"] == n and r["target_rate"] == TARGET_P99_RATE]
        p99 = rows[0]["p99_ms"] if rows else None
        out.append({"target": f"p99 <= {TARGET_P99_MS:g} ms at {TARGET_P99_RATE:g} "
                    f"windows/s, {n} device(s)", "value": p99,
                    "met": None if p99 is None else bool(p99 <= TARGET_P99_MS
                                                          and rows[0]["pacing_ok"])})
    cpu = result["idle"]["cpu_pct"]
    out.append({"target": f"idle CPU <= {TARGET_IDLE_CPU_PCT:g} % of a core",
                "value": round(cpu, 2), "met": cpu <= TARGET_IDLE_CPU_PCT})
    return out




def report(result: dict) -> None:
    print_table(result["raw_ceiling"], ["frame_samples", "sent_per_s", "received_per_s",
                                        "sent", "received"],
                title="raw ceiling: paho subscriber, counting callback (msgs/s)")
    print()
    print_table(flat(result["ingest"]), ["frame_samples", "sent_per_s", "frames_per_s",
                                   "windows_per_s", "pct_of_ceiling", "dropped"],
                title="sustained ingest: reverie run under a flood")
    print()
    print_table(flat(result["latency"]), ["devices", "target_rate", "achieved_rate", "sent",
                                    "lost", "dropped", "p50_ms", "p99_ms", "max_ms",
                                    "daemon_p99_ms"],
                title="latency: frame published -> prediction received (ms)")
    print()
    idle = result["idle"]
    print(f"idle: {idle['cpu_pct']:.2f} % of a core over {idle['seconds']:.0f} s; RSS idle "
          f"{idle['rss_mb']:.0f} MB, after load {idle['after_load']['rss_mb']:.0f} MB "
          f"(peak {idle['after_load']['peak_rss_mb']:.0f} MB); gateway after load "
          f"{result['gateway_after_load']['rss_mb']:.0f} MB")
    print(f"machine: {result['environment'].get('cpus')} cpus, busy "
          f"{result['machine_busy_pct']:.0f} % during the run, load average before "
          f"{result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}")
    print()
    print_verdicts(result["targets"])
