"""``reverie demo``: the whole loop on one machine, in under three minutes.

1. an embedded broker (a private mosquitto if the binary exists, else in-process amqtt),
   or ``--broker URL``;
2. a base model trained on simulated sensor data on first run (cached afterwards);
3. the agent daemon (``reverie run``, a real subprocess) serving every device;
4. simulated devices streaming frames whose class changes over time;
5. live: what the agent predicts for each window against the simulator's truth.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path

DEMO_BUNDLE_NAME = "demo-base-v2"  # bump when the simulator or the demo's model changes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="local demo: broker, base model, agent and simulated devices",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default=None,
                   help="use this broker instead of starting an embedded one (mqtt://HOST:PORT)")
    p.add_argument("--devices", type=int, default=3, help="simulated devices (default 3)")
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds of streaming (default 60)")
    p.add_argument("--speed", type=float, default=4.0,
                   help="simulated time per wall-clock second (default 4x real time)")
    p.add_argument("--cache-dir", default=os.environ.get("REVERIE_DEMO_CACHE", ".reverie/demo"),
                   help="where the trained base model is cached (default .reverie/demo)")
    p.add_argument("--retrain", action="store_true", help="ignore the cached base model")
    p.add_argument("--bundle", default=None,
                   help="use this bundle (trained on the simulator's classes) instead of "
                        "training or reusing the cached one")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default=None,
                   help="MQTT version (default: 5 when the broker speaks it)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def ensure_bundle(cache_dir: Path, *, retrain: bool = False, seed: int = 0) -> Path:
    """The cached base bundle, trained on simulated data if missing or stale."""
    from agent.bundle import load_bundle
    from agent.errors import BundleError

    bundle_dir = cache_dir / "bundle"
    if not retrain and bundle_dir.exists():
        try:
            b = load_bundle(bundle_dir)
            if b.manifest.get("name") == DEMO_BUNDLE_NAME:
                _say(f"using cached base model {bundle_dir} ({b.bundle_id})")
                return bundle_dir
            _say("cached base model is from another demo version: retraining")
        except BundleError as exc:
            _say(f"cached base model unusable ({exc}): retraining")
    from export import train_bundle
    from firmware_sim.signals import write_dataset

    cache_dir.mkdir(parents=True, exist_ok=True)
    data = write_dataset(cache_dir / "train.npz", n_per_class=200, seed=seed)
    _say(f"training the base model on simulated data ({data}); first run only")
    t0 = time.perf_counter()
    train_bundle(data, bundle_dir, name=DEMO_BUNDLE_NAME, seed=seed, force=True)
    _say(f"trained and exported in {time.perf_counter() - t0:.1f} s -> {bundle_dir}")
    return bundle_dir


class Scoreboard:
    """Collects predictions from MQTT and compares them with the simulator's truth."""

    def __init__(self, sim, quiet: bool):
        self.sim = sim
        self.quiet = quiet
        self.lock = threading.Lock()
        self.total = 0
        self.correct = 0
        self.recent: deque[bool] = deque(maxlen=20)
        self.per_class: Counter = Counter()
        self.per_class_ok: Counter = Counter()
        self.latencies: list[float] = []
        self.errors = 0
        self.novelty = 0

    def on_prediction(self, body: dict) -> None:
        device = body["device"]
        try:
            votes = Counter(self.sim.truth(device, s)
                            for s in range(body["seq_first"], body["seq_last"] + 1))
        except (ValueError, KeyError):  # not one of our devices or frames
            return
        truth = votes.most_common(1)[0][0]
        ok = body["label"] == truth
        with self.lock:
            self.total += 1
            self.correct += ok
            self.recent.append(ok)
            self.per_class[truth] += 1
            self.per_class_ok[truth] += ok
            self.latencies.append(body["latency_ms"])
            rolling = sum(self.recent) / len(self.recent)
        if not self.quiet:
            mark = "ok " if ok else "MISS"
            print(f"  {device:<8} window {body['window']:>4}  predicted {body['label']:<7} "
                  f"({body['confidence']:.2f})  truth {truth:<7} {mark}  "
                  f"rolling acc {rolling:5.1%}", flush=True)

    def summary(self) -> dict:
        with self.lock:
            lat = sorted(self.latencies)
            return {
                "windows": self.total,
                "accuracy": self.correct / self.total if self.total else None,
                "recall": {c: self.per_class_ok[c] / n for c, n in sorted(self.per_class.items())},
                "latency_ms_p50": lat[len(lat) // 2] if lat else None,
                "error_events": self.errors,
                "novelty_events": self.novelty,
            }


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.mqtt import BrokerURL, make_client
    from agent.protocol import decode_json_object
    from agent.topics import Topics
    from firmware_sim.broker import EmbeddedBroker
    from firmware_sim.sim import Simulator

    t_start = time.monotonic()
    cache_dir = Path(args.cache_dir)
    if args.bundle:
        bundle_dir = Path(args.bundle)
    else:
        bundle_dir = ensure_bundle(cache_dir, retrain=args.retrain, seed=args.seed)

    broker = None
    if args.broker:
        url = args.broker
    else:
        broker = EmbeddedBroker(prefer="auto")
        broker.start()
        url = broker.url
        _say(f"embedded broker: {broker.kind} on {url}")
    protocol = args.protocol or ("5" if broker is None or "5" in broker.protocols else "3.1.1")
    agent_proc = None
    probe = None
    try:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        agent_proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--bundle", str(bundle_dir),
             "--broker", url, "--device-id", "+", "--protocol", protocol,
             "--log-level", "warning"], env=env)
        topics = Topics("+")
        online = threading.Event()
        sim = Simulator(url, devices=args.devices, duration_s=args.duration, speed=args.speed,
                        seed=args.seed, protocol=protocol)
        board = Scoreboard(sim, args.quiet)

        def on_message(_c, _u, msg):
            try:
                body = decode_json_object(msg.payload, msg.topic)
            except Exception:  # noqa: BLE001 - a demo printer must not die
                return
            kind = msg.topic.rsplit("/", 1)[-1]
            if kind == "status" and body.get("state") == "online":
                online.set()
            elif kind == "predictions":
                board.on_prediction(body)
            elif kind == "events" and body.get("type") == "novelty":
                board.novelty += 1  # e.g. windows that straddle a change of activity
            elif kind == "events":
                board.errors += 1
                _say(f"agent event: {body.get('reason')}: {body.get('detail')}")

        probe = make_client(BrokerURL.parse(url), protocol=protocol)
        probe.on_message = on_message
        connected = threading.Event()
        probe.on_connect = lambda c, *_: (c.subscribe([(topics.predictions, 0),
                                                        (topics.events, 0),
                                                        (Topics("gateway").status, 1)]),
                                          connected.set())
        b = BrokerURL.parse(url)
        probe.connect(b.host, b.port)
        probe.loop_start()
        if not connected.wait(10):
            _say(f"cannot connect to {url}")
            return 1
        if not online.wait(30):
            _say("the agent did not come online within 30 s")
            return 1
        _say(f"agent online; streaming {args.devices} device(s) for {args.duration:.0f} s "
             f"at {args.speed:g}x real time")
        stats = sim.run()
        time.sleep(1.0)  # the last windows are still in flight
        summary = board.summary()
        summary["frames_sent"] = sum(stats.frames_sent.values())
        summary["elapsed_s"] = round(time.monotonic() - t_start, 1)
        _say("summary " + json.dumps(summary, indent=2))
        if not summary["windows"]:
            _say("no predictions arrived: something is wrong")
            return 1
        return 0
    finally:
        if probe is not None:
            probe.loop_stop()
            probe.disconnect()
        if agent_proc is not None:
            agent_proc.send_signal(signal.SIGTERM)
            try:
                rc = agent_proc.wait(timeout=10)
                _say(f"agent stopped (exit {rc})")
            except subprocess.TimeoutExpired:
                agent_proc.kill()
                _say("agent did not stop within 10 s: killed")
        if broker is not None:
            broker.stop()
