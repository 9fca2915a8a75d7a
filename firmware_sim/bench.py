"""``reverie bench sim``: how many devices, at what sample rate, one simulator process sustains.

For each devices x per-device sample rate, a `ScenarioRunner` streams a plain scenario (the
IMU model at that rate, idle / walk / run in bouts of 5-20 s, no impairments, no labels)
for ``--seconds`` to a private mosquitto (`EmbeddedBroker`; or ``--broker``), and a
*separate subscriber process* records when each frame arrives. The sustained rate of a
device is ``frame_samples`` times the least-squares slope of its frame count over arrival
time (robust to a late start or a jittery end, unlike ``(n - 1) / (last - first)``); a
configuration passes when every device's rate is within ``--tolerance`` (1 %) of the target
and at least 99 % of the frames sent arrived. So the figure includes everything a real
consumer sees: generation, encoding, the client, the broker, the network stack.

Then the speed factor: ``--speed-devices`` devices at the model's native 50 Hz, run flat
out (an unreachable `speed`) for ``--seconds``: stream seconds per wall second, as the
engine produced them and as the subscriber received them. The baseline, measured in the
same run, is generation alone (`ScenarioRunner.dry_run`: sources, impairment, encoding, no
MQTT), which bounds what any client could reach.

The simulator, the broker and the subscriber share the machine's cores: on a 2-core
machine the subscriber's and the broker's CPU come out of the simulator's budget.

Registered through the ``reverie.bench`` entry-point group; importing this module is cheap.
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path

FLAT_OUT = 1e6  # a speed no machine reaches: the engine runs as fast as it can
NATIVE_HZ = 50.0


def register(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "sim", help="simulator scale: devices x sample rate sustained within 1 %%, speed factor",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=_ints, default=(1, 10, 100, 200), metavar="N,N,..",
                   help="device counts (default: 1,10,100,200)")
    p.add_argument("--rates", type=_floats, default=(50.0, 200.0, 1000.0), metavar="HZ,..",
                   help="per-device sample rates (default: 50,200,1000)")
    p.add_argument("--seconds", type=float, default=10.0, metavar="S",
                   help="wall seconds per configuration (default: 10)")
    p.add_argument("--frame-samples", type=int, default=16, metavar="N",
                   help="samples per frame (default: 16)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="allowed relative shortfall of the rate (default: 0.01)")
    p.add_argument("--speed-devices", type=int, default=100, metavar="N",
                   help="devices for the speed-factor run; 0 skips it (default: 100)")
    p.add_argument("--broker", default=None, metavar="URL",
                   help="use this broker instead of a private mosquitto")
    p.add_argument("--json", type=Path, default=None, metavar="OUT",
                   help="also write the results here (JSON)")
    p.set_defaults(func=cmd_sim)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid list: {text!r} (expected N,N,..)") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"invalid list: {text!r} (expected counts >= 1)")
    return values


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid list: {text!r} (expected HZ,HZ,..)") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"invalid list: {text!r} (expected rates > 0)")
    return values


def bench_scenario(devices: int, rate_hz: float, duration_s: float, frame_samples: int):
    """The plain scenario the benchmark streams."""
    from firmware_sim.scenario import scenario_from_dict
    from firmware_sim.sensors import get_model

    classes = list(get_model("imu").classes[:3])
    return scenario_from_dict({
        "name": "bench", "seed": 0,
        "sensor": {"model": "imu", "params": {"rate_hz": rate_hz}},
        "devices": {"count": devices, "frame_samples": frame_samples,
                    "window_samples": frame_samples},
        "classes": {"base": classes},
        "phases": [{"name": "steady", "duration_s": duration_s,
                    "mix": dict.fromkeys(classes, 1.0), "segment_s": [5.0, 20.0]}],
        "labels": {"fraction": 0.0}}, "<bench>")


# --- the subscriber process ------------------------------------------------------------


def _subscriber_main() -> None:
    """The subscriber process (``python -c ...`` with URL and topic filter as arguments):
    records frame arrivals per device until a line arrives on stdin, then prints
    ``{device: [frames, frames per second]}`` as JSON."""
    import json
    import sys
    import threading

    from agent.mqtt import BrokerURL, make_client

    url, topic_filter = sys.argv[1:3]
    b = BrokerURL.parse(url)
    arrivals: dict[str, list[float]] = {}  # device -> arrival times
    subscribed = threading.Event()

    def on_message(client, userdata, msg):
        arrivals.setdefault(msg.topic.rsplit("/", 2)[-2], []).append(time.monotonic())

    client = make_client(b, protocol="3.1.1")
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(topic_filter, qos=0)
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(b.host, b.port, keepalive=60)
    client.loop_start()
    print("ready" if subscribed.wait(10) else "no SUBACK", flush=True)
    sys.stdin.readline()
    client.loop_stop()
    client.disconnect()
    print(json.dumps({d: [len(t), frame_rate(t)] for d, t in arrivals.items()}), flush=True)


def frame_rate(arrivals: list[float]) -> float:
    """Frames per second: the least-squares slope of frame count over arrival time, which
    one late first (or early last) frame does not skew like ``(n - 1) / (last - first)``."""
    import numpy as np

    if len(arrivals) < 2 or arrivals[-1] <= arrivals[0]:
        return 0.0
    t = np.asarray(arrivals) - arrivals[0]
    return float(np.polyfit(t, np.arange(len(t)), 1)[0])


class Subscriber:
    """A subscriber process counting ``{prefix}/+/frames`` per device."""

    def __init__(self, url: str, prefix: str):
        import subprocess
        import sys

        code = "from firmware_sim.bench import _subscriber_main; _subscriber_main()"
        self._proc = subprocess.Popen([sys.executable, "-c", code, url, f"{prefix}/+/frames"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self._proc.stdout.readline().strip()
        if ready != "ready":
            self._proc.kill()
            raise RuntimeError(f"bench subscriber did not start: {ready or 'no answer'}")

    def stop(self, settle_s: float = 1.0) -> dict[str, list]:
        import json

        time.sleep(settle_s)  # frames in flight
        out, _ = self._proc.communicate("stop\n", timeout=30)
        return json.loads(out)


def _received_rates(counts: dict[str, list], frame_samples: int) -> list[float]:
    return [fps * frame_samples for n, fps in counts.values() if fps > 0]


# --- the runs ----------------------------------------------------------------------------


def run_rate(url: str, devices: int, rate_hz: float, seconds: float, frame_samples: int,
             tolerance: float) -> dict:
    """One devices x rate configuration in real time."""
    from firmware_sim.runner import ScenarioRunner

    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    sc = bench_scenario(devices, rate_hz, seconds, frame_samples)
    runner = ScenarioRunner(sc, url, prefix=prefix, protocol="3.1.1", speed=1.0)
    sub = Subscriber(url, prefix)
    cpu0 = time.process_time()
    stats = runner.run()
    cpu = time.process_time() - cpu0
    counts = sub.stop()
    rates = _received_rates(counts, frame_samples)
    sent = sum(stats.frames_sent.values())
    received = sum(c[0] for c in counts.values())
    min_rate = min(rates) if len(rates) == devices else 0.0
    ok = min_rate >= rate_hz * (1 - tolerance) and received >= 0.99 * sent
    return {"devices": devices, "rate_hz": rate_hz, "frames_per_s": devices * rate_hz / frame_samples,
            "received_rate_hz": sum(rates) / len(rates) if rates else 0.0,
            "min_received_rate_hz": min_rate, "sent_rate_hz": stats.sample_rate_hz,
            "delivered": received / sent if sent else 0.0, "max_lag_ms": stats.max_lag_s * 1e3,
            "sim_cpu": cpu / stats.elapsed_s if stats.elapsed_s else 0.0, "ok": ok}


def run_speed(url: str, devices: int, seconds: float, frame_samples: int) -> dict:
    """`devices` at the native rate, flat out for `seconds`; and generation alone."""
    from firmware_sim.runner import ScenarioRunner

    stream_s = max(60.0, seconds * 400)  # more than any machine gets through
    sc = bench_scenario(devices, NATIVE_HZ, stream_s, frame_samples)
    gen = ScenarioRunner(sc, url, speed=1.0)
    t0 = time.perf_counter()
    probe_s = min(stream_s, 60.0)
    n_msgs = sum(1 for _ in gen.dry_run(probe_s))
    gen_speed = probe_s / (time.perf_counter() - t0)

    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    runner = ScenarioRunner(sc, url, prefix=prefix, protocol="3.1.1", speed=FLAT_OUT)
    sub = Subscriber(url, prefix)
    runner.start()
    time.sleep(seconds)
    runner.stop()
    stats = runner.join(30)
    counts = sub.stop()
    rates = _received_rates(counts, frame_samples)
    return {"devices": devices, "rate_hz": NATIVE_HZ, "speed_sent": stats.speed_achieved,
            "speed_received": (sum(rates) / len(rates) / NATIVE_HZ) if rates else 0.0,
            "frames_per_s_sent": sum(stats.frames_sent.values()) / stats.elapsed_s,
            "speed_generation_only": gen_speed, "generation_only_msgs": n_msgs}


def cmd_sim(args: argparse.Namespace) -> int:
    from agent.bench.cli import environment, print_table, write_json
    from firmware_sim.broker import EmbeddedBroker

    broker = None
    url = args.broker
    if url is None:
        broker = EmbeddedBroker(prefer="mosquitto").start()
        url = broker.url
    try:
        rows = []
        for n in args.devices:
            for rate in args.rates:
                row = run_rate(url, n, rate, args.seconds, args.frame_samples, args.tolerance)
                rows.append(row)
                print(f"bench sim: {n} device(s) x {rate:g} Hz: {row['min_received_rate_hz']:.2f}"
                      f" Hz received (slowest device), {'ok' if row['ok'] else 'SHORT'}",
                      flush=True)
        speed = (run_speed(url, args.speed_devices, args.seconds, args.frame_samples)
                 if args.speed_devices > 0 else None)
    finally:
        if broker is not None:
            broker.stop()
    print()
    print_table(rows, ["devices", "rate_hz", "frames_per_s", "received_rate_hz",
                       "min_received_rate_hz", "delivered", "max_lag_ms", "sim_cpu", "ok"],
                title=f"sustained rate per device over {args.seconds:g} s, as received "
                      f"(ok: every device within {args.tolerance:.0%} of the target)")
    if speed is not None:
        print()
        print_table([speed], list(speed), title="speed factor, flat out (stream s per wall s)")
    write_json(args.json, {"bench": "sim", "environment": environment(),
                           "seconds": args.seconds, "frame_samples": args.frame_samples,
                           "tolerance": args.tolerance, "rates": rows, "speed": speed})
    return 0
