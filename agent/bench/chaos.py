"""``reverie bench chaos``: the daemon under faults, as a benchmark (issue 8, parts 1-4).

One private mosquitto (persistence on; chaos_rig.py), the real ``reverie run`` in child
processes, and four campaigns:

* ``crash`` (chaos_crash.py): N SIGKILLs at random moments (mid stream, mid log append,
  mid checkpoint, mid sleep) under a live stream of frames and labels; after each:
  the state files verify, predictions resume; at the end every label the broker accepted
  is learned exactly once; restart time p50/p99.
* ``disk`` (chaos_disk.py): a full tmpfs during log appends and a checkpoint; a flipped
  byte or a truncation in the newest checkpoint, log segment and a bundle file.
* ``broker`` (chaos_broker.py): mosquitto SIGTERMed or SIGKILLed mid-stream and started
  again; reconnect time, session, labels lost by the agent vs at the broker.
* ``overload`` (chaos_overload.py): 10x the nominal frame rate; queue depth, drops by
  reason, RSS, latency before/during/after.

Every campaign writes its figures into one JSON; the table shows the issue's targets.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
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

CAMPAIGNS = ("crash", "disk", "broker", "overload")
TARGET_CYCLES = 200
TARGET_RECONNECT_S = 2.0
TARGET_RSS_GROWTH_MB = 20.0


@dataclass(frozen=True)
class Plan:
    cycles: int = TARGET_CYCLES
    seed: int = 0
    outages: tuple[tuple[str, float], ...] = (("term", 2.0), ("kill", 1.0), ("kill", 3.0),
                                              ("kill", 8.0))
    nominal_rate: float = 200.0         # windows/s, one device
    factor: float = 10.0
    overload_s: float = 60.0
    calm_s: float = 5.0
    campaigns: tuple[str, ...] = CAMPAIGNS

    def __post_init__(self) -> None:
        from agent.errors import ConfigError

        if self.cycles < 1:
            raise ConfigError(f"cycles={self.cycles!r}, expected an int >= 1")
        for name in ("nominal_rate", "factor", "overload_s", "calm_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}, expected a number > 0")
        bad = [c for c in self.campaigns if c not in CAMPAIGNS]
        if bad or not self.campaigns:
            raise ConfigError(f"campaigns {bad or list(self.campaigns)!r}: expected some of "
                              f"{', '.join(CAMPAIGNS)}")

    @classmethod
    def quick(cls, **changes) -> Plan:
        return cls(**{"cycles": 5, "outages": (("term", 1.0), ("kill", 1.0)),
                      "overload_s": 5.0, "calm_s": 2.0, **changes})


def register(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("chaos", help="the daemon under faults: SIGKILL campaign, full "
                             "and damaged disk, broker restarts, 10x overload",
                             description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=None,
                   help=f"SIGKILL cycles of the crash campaign (default {TARGET_CYCLES})")
    p.add_argument("--seed", type=int, default=0, help="kill moments and data (default 0)")
    p.add_argument("--only", default=None,
                   help=f"campaigns to run, comma-separated (default {','.join(CAMPAIGNS)})")
    p.add_argument("--nominal-rate", type=float, default=None,
                   help="nominal frame rate of the overload, windows/s (default 200)")
    p.add_argument("--overload-seconds", type=float, default=None,
                   help="length of the overload (default 60)")
    p.add_argument("--bundle", default=None, help="bundle to serve (default: the demo's)")
    p.add_argument("--cache-dir", default=os.environ.get("REVERIE_DEMO_CACHE", ".reverie/demo"),
                   help="where the demo bundle is cached (default .reverie/demo)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 5 cycles, two 1 s "
                   "broker outages, a 5 s overload")
    p.add_argument("--json", default=None, help="write the results here")
    p.set_defaults(func=cmd_chaos)


def plan_from_args(args: argparse.Namespace) -> Plan:
    changes: dict[str, object] = {"seed": args.seed}
    if args.cycles is not None:
        changes["cycles"] = args.cycles
    if args.only:
        changes["campaigns"] = tuple(c.strip() for c in args.only.split(",") if c.strip())
    if args.nominal_rate is not None:
        changes["nominal_rate"] = args.nominal_rate
    if args.overload_seconds is not None:
        changes["overload_s"] = args.overload_seconds
    return Plan.quick(**changes) if args.quick else Plan(**changes)


def cmd_chaos(args: argparse.Namespace) -> int:
    from agent.bench.e2e import procs
    from agent.bundle import load_bundle

    plan = plan_from_args(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bundle_dir = Path(args.bundle) if args.bundle else procs.demo_bundle(Path(args.cache_dir))
    bundle = load_bundle(bundle_dir)
    shape = {"window": bundle.input.window_samples, "channels": bundle.input.n_channels}
    result: dict = {"bench": "chaos", "environment": environment(), "command": command_line(),
                    "plan": asdict(plan), "bundle": bundle.bundle_id}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reverie-chaos-")))
        result["campaigns"] = run_campaigns(plan, bundle_dir, tmp, shape, stack)
    result["targets"] = targets(result["campaigns"])
    report(result)
    write_json(args.json, result)
    return 0 if all(t["met"] is not False for t in result["targets"]) else 1


def run_campaigns(plan: Plan, bundle: Path, tmp: Path, shape: dict, stack: ExitStack) -> dict:
    from agent.bench.chaos_rig import Broker

    broker = Broker(tmp)
    stack.callback(broker.close)
    out: dict = {}
    for name in plan.campaigns:
        t0 = time.monotonic()
        say("chaos", f"{name} campaign ...")
        work = tmp / f"campaign-{name}"
        work.mkdir()
        if name == "crash":
            from agent.bench.chaos_crash import crash_campaign

            out[name] = crash_campaign(bundle, broker.url, work, cycles=plan.cycles,
                                       seed=plan.seed, **shape)
        elif name == "disk":
            from agent.bench.chaos_disk import damage, disk_full

            out[name] = {"full": disk_full(bundle, broker.url, work, seed=plan.seed, **shape),
                         "damage": damage(bundle, broker.url, work, seed=plan.seed, **shape)}
        elif name == "broker":
            from agent.bench.chaos_broker import broker_campaign

            out[name] = broker_campaign(bundle, broker, work, seed=plan.seed,
                                        outages=[tuple(o) for o in plan.outages], **shape)
        else:
            from agent.bench.chaos_overload import overload

            out[name] = overload(bundle, broker.url, work, nominal_rate=plan.nominal_rate,
                                 factor=plan.factor, seconds=plan.overload_s,
                                 calm_s=plan.calm_s, **shape)
        say("chaos", f"{name} campaign done in {time.monotonic() - t0:.0f} s")
    return out


def targets(c: dict) -> list[dict]:
    """The issue's targets against this run; ``met`` is None when not measured."""
    out = []
    crash = c.get("crash")
    if crash:
        bad = crash["corrupt_states"] + crash["labels_lost"] + crash["labels_duplicated"]
        out.append({"target": f"crash: {TARGET_CYCLES} cycles, zero corrupt states, zero lost "
                    "or duplicated acknowledged labels",
                    "value": f"{crash['cycles']} cycles, {crash['corrupt_states']} corrupt, "
                    f"{crash['labels_lost']} lost, {crash['labels_duplicated']} duplicated",
                    "met": None if crash["cycles"] < TARGET_CYCLES else bad == 0})
    broker = c.get("broker")
    if broker:
        worst = max((r["reconnect_s"] if r["reconnect_s"] is not None else float("inf"))
                    for r in broker["outages"])
        out.append({"target": f"broker: reconnected within {TARGET_RECONNECT_S:g} s of the "
                    "broker's return (every outage)", "value": round(worst, 2),
                    "met": worst <= TARGET_RECONNECT_S})
        lost_by_agent = broker["labels_lost"] - sum(broker["lost_at_broker"].values())
        out.append({"target": "broker: no QoS 1 label lost by the agent",
                    "value": f"{lost_by_agent} lost by the agent, "
                    f"{broker['lost_at_broker']} lost at the broker",
                    "met": lost_by_agent == 0 and broker["labels_duplicated"] == 0})
    load = c.get("overload")
    if load:
        out.append({"target": f"overload: RSS growth <= {TARGET_RSS_GROWTH_MB:g} MB over "
                    f"{load['seconds']:g} s at {load['factor']:g}x",
                    "value": round(load["rss_growth_mb"], 1),
                    "met": load["rss_growth_mb"] <= TARGET_RSS_GROWTH_MB})
        out.append({"target": "overload: frame queue within ingest.queue_size",
                    "value": load["queue_depth_max"],
                    "met": load["queue_depth_max"] <= load["queue_size"]})
    disk = c.get("disk")
    if disk:
        full = disk["full"]
        out.append({"target": "disk full: error reported, serving, last good state loads, "
                    "labels learned once space is back",
                    "value": full.get("skipped") or full.get("ok"),
                    "met": None if "skipped" in full else full["ok"]})
    return out


def report(result: dict) -> None:
    c = result["campaigns"]
    if "crash" in c:
        r = c["crash"]
        print_table([{k: r[k] for k in ("cycles", "labels_accepted", "labels_acknowledged",
                                         "labels_recovered", "labels_lost", "labels_duplicated",
                                         "corrupt_states", "restart_p50_s", "restart_p99_s")}],
                    ["cycles", "labels_accepted", "labels_acknowledged", "labels_recovered",
                     "labels_lost", "labels_duplicated", "corrupt_states", "restart_p50_s",
                     "restart_p99_s"], title="crash campaign (SIGKILL)")
        print(f"  kills by moment: {r['kills_by_mode']}; evidence: {r['evidence']}; "
              f"predictions stalled after {len(r['predictions_stalled'])} restarts\n")
    if "disk" in c:
        full = c["disk"]["full"]
        if "skipped" in full:
            print(f"disk full: skipped ({full['skipped']})")
        else:
            print(f"disk full ({full['method']}): {full['learn_failed_events']} learn_failed "
                  f"events, e.g. {full['learn_failed_example']!r}; snapshot while full: "
                  f"{full['snapshot_while_full']}; predictions while full: "
                  f"{full['predictions_while_full']}; last good state: "
                  f"{full['last_good_state']}; learned after space returned: "
                  f"{full['learned_after_space_returned']} ({full['relearn_s']:.1f} s)")
        print()
        print_table(c["disk"]["damage"], ["case", "serves", "labels_held", "labels_total",
                                          "message"], title="damaged files")
        print()
    if "broker" in c:
        b = c["broker"]
        print_table(b["outages"], ["signal", "down_s", "reconnect_s", "reconnects",
                                   "session_present", "labels_after_learned"],
                    title="broker restarts")
        print(f"  labels accepted {b['labels_accepted']}, lost {b['labels_lost']} (at the "
              f"broker: {b['lost_at_broker']}), duplicated {b['labels_duplicated']}\n")
    if "overload" in c:
        o = c["overload"]
        print_table(flat(o["phases"]), ["phase", "target_rate", "achieved_rate", "sent", "lost", "dropped",
                           "p50_ms", "p99_ms"], title="overload")
        print(f"  queue depth max {o['queue_depth_max']:.0f} of {o['queue_size']}; RSS start "
              f"{o['rss_start_mb']:.0f} MB, max {o['rss_max_mb']:.0f} MB, end "
              f"{o['rss_end_mb']:.0f} MB\n")
    print_verdicts(result["targets"])




