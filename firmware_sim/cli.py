"""``reverie sim``: simulated devices over MQTT (``--scenario``: a scenario), ``reverie sim
replay``: a dataset streamed as a device, and ``reverie sim dataset``: a training set.

Registered through the ``reverie.commands`` entry point (pyproject.toml). Importing this
module stays cheap: numpy, paho and the simulator load only when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"

EPILOG = """\
modes:
  reverie sim [options]               stream frames from simulated devices until --duration
                                      has passed (or Ctrl-C); prints stats at the end
  reverie sim --scenario NAME|FILE    run a scenario (firmware_sim/scenarios, or a TOML
                                      file): devices, impairments, labels, sleeps
  reverie sim replay --data D.npz --device ID --rate HZ
                                      stream a dataset's windows as one device's frames,
                                      with its labels through the label oracle
  reverie sim dataset --out D.npz     write a labelled dataset of independent windows of
                                      the same signal classes, for `reverie export`
  reverie sim broker --port N         a private MQTT broker on 127.0.0.1:N until stopped
                                      (mosquitto; amqtt, MQTT 3.1.1 only, without it)

examples:
  reverie sim --devices 3 --duration 30 --speed 2
  reverie sim --scenario smoke --speed 4
  reverie sim replay --data data/imu.npz --device rec-1 --rate 50 --labels 0.2 --loop
  reverie sim --broker mqtt://gateway:1883 --encoding binary --classes idle,walk,run
  reverie sim dataset --out data/imu.npz --n-per-class 300 --classes idle,walk,run,stairs
  reverie sim dataset --model vibration --out data/vib.npz --window 256
"""


def _classes(text: str) -> tuple[str, ...]:
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"invalid class list: {text!r} (expected a,b,c)")
    return names


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"invalid value: {text!r} (expected > 0)")
        return value
    return parse


def register_sim(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sim`` (and its ``dataset`` mode) to the ``reverie`` parser."""
    p = subparsers.add_parser(
        "sim", help="simulated devices publishing frames over MQTT (or: sim replay, "
                    "sim dataset)",
        description="Simulated 6-channel IMU devices (50 Hz) publishing sensor frames to "
                    "{prefix}/{device}/frames, each switching between activity classes "
                    "at random; with --scenario, a scenario's devices (sensor model, "
                    "impairments, network faults, labels, sleeps).",
        usage="reverie sim [options]\n       reverie sim --scenario NAME|FILE [options]\n"
              "       reverie sim replay --data D.npz --device ID [--rate HZ] [options]\n"
              "       reverie sim dataset --out D.npz [options]\n"
              "       reverie sim broker [--port N]",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default=DEFAULT_BROKER, metavar="URL",
                   help=f"MQTT broker URL (default: {DEFAULT_BROKER})")
    p.add_argument("--scenario", default=None, metavar="NAME|FILE",
                   help="run this scenario (a shipped name or a .toml file) instead of "
                        "random activities")
    p.add_argument("--devices", type=_positive(int), default=None, metavar="N",
                   help="number of devices, ids sim-000, sim-001, ... (default: 1, or the "
                        "scenario's)")
    p.add_argument("--duration", type=float, default=0.0, metavar="S",
                   help="wall-clock seconds to run; 0 runs until Ctrl-C, or a scenario to "
                        "its end (default: 0)")
    p.add_argument("--speed", type=_positive(float), default=1.0, metavar="X",
                   help="time scale: X times real time (default: 1)")
    p.add_argument("--encoding", choices=("json", "binary"), default="binary",
                   help="frame encoding (default: binary)")
    p.add_argument("--frame-samples", type=_positive(int), default=16, metavar="N",
                   help="samples per frame (default: 16)")
    p.add_argument("--classes", type=_classes, default=None, metavar="A,B,..",
                   help="the classes devices switch between (default: all)")
    p.add_argument("--segment", type=_positive(float), nargs=2, default=(5.0, 20.0),
                   metavar=("MIN_S", "MAX_S"), help="class segment length range (default: 5 20)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--prefix", default="reverie/v1", help="topic prefix (default: reverie/v1)")
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="5",
                   help="MQTT protocol version (default: 5)")
    p.set_defaults(func=_run_sim)

    modes = p.add_subparsers(dest="sim_mode", metavar="MODE")
    # prog: the parent's multi-line usage would otherwise prefix this one's usage line
    d = modes.add_parser("dataset", prog="reverie sim dataset",
                         help="write a labelled NPZ dataset and exit",
                         description="Write independent windows of the simulator's signal "
                                     "classes in the NPZ dataset format (X: N x channels x "
                                     "window).")
    d.add_argument("--out", required=True, metavar="D.npz", help="output file")
    d.add_argument("--model", default=None, metavar="NAME",
                   help="sensor model of firmware_sim.sensors: imu, vibration or environment "
                        "(default: the 6-class IMU generator the simulator streams)")
    d.add_argument("--n-per-class", type=_positive(int), default=200, metavar="N",
                   help="windows per class (default: 200)")
    d.add_argument("--window", type=_positive(int), default=128, metavar="T",
                   help="samples per window (default: 128)")
    d.add_argument("--classes", type=_classes, default=None, metavar="A,B,..",
                   help="classes to include, in this order (default: all)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    d.set_defaults(func=_run_dataset)

    r = modes.add_parser("replay", prog="reverie sim replay",
                         help="stream an NPZ dataset as one device's frames",
                         description="Stream every window of an NPZ dataset (X: N x C x T), "
                                     "in a seeded order, as one device's frames, with its "
                                     "labels published through the label oracle.")
    r.add_argument("--data", required=True, metavar="D.npz", help="the dataset")
    r.add_argument("--device", required=True, metavar="ID", help="the device id")
    r.add_argument("--rate", type=_positive(float), default=None, metavar="HZ",
                   help="sample rate (default: the dataset's sample_rate_hz)")
    r.add_argument("--frame-samples", type=_positive(int), default=16, metavar="N",
                   help="samples per frame (default: 16)")
    r.add_argument("--labels", type=float, default=0.1, metavar="FRACTION",
                   help="fraction of class segments labelled (default: 0.1)")
    r.add_argument("--label-delay", type=float, default=5.0, metavar="S",
                   help="seconds from a segment's end to its label (default: 5)")
    r.add_argument("--loop", action="store_true", help="start over at the end (new order)")
    r.add_argument("--duration", type=float, default=0.0, metavar="S",
                   help="wall-clock seconds to run; 0: to the end, or until Ctrl-C with "
                        "--loop (default: 0)")
    r.add_argument("--broker", default=DEFAULT_BROKER, metavar="URL",
                   help=f"MQTT broker URL (default: {DEFAULT_BROKER})")
    r.add_argument("--speed", type=_positive(float), default=1.0, metavar="X",
                   help="time scale: X times real time (default: 1)")
    r.add_argument("--encoding", choices=("json", "binary"), default="binary",
                   help="frame encoding (default: binary)")
    r.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    r.add_argument("--prefix", default="reverie/v1", help="topic prefix (default: reverie/v1)")
    r.add_argument("--protocol", choices=("5", "3.1.1"), default="5",
                   help="MQTT protocol version (default: 5)")
    r.set_defaults(func=_run_replay)

    b = modes.add_parser("broker", prog="reverie sim broker",
                         help="run a private MQTT broker on 127.0.0.1 until stopped",
                         description="A throwaway MQTT broker on 127.0.0.1 (no persistence, "
                                     "no authentication) for trying reverie out without "
                                     "touching another broker: mosquitto (MQTT 3.1.1 and 5) "
                                     "when installed, else amqtt (MQTT 3.1.1 only: run the "
                                     "agent and the simulator with --protocol 3.1.1). Runs "
                                     "until Ctrl-C or SIGTERM.")
    b.add_argument("--port", type=_port, default=None, metavar="N",
                   help="listen on this port (default: a free one, printed)")
    b.add_argument("--prefer", choices=("auto", "mosquitto", "amqtt"), default="auto",
                   help="which broker (default: auto, mosquitto if installed)")
    b.set_defaults(func=_run_broker)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"invalid port: {text!r} (expected 1-65535)")
    return value


def _run_broker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from agent.errors import BrokerError
    from firmware_sim.broker import EmbeddedBroker, _PortInUse

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    broker = EmbeddedBroker(prefer=args.prefer, port=args.port)
    try:
        broker.start()
    except _PortInUse:
        raise BrokerError(f"port {args.port} on 127.0.0.1 is in use: choose another --port "
                          "(or leave it out for a free one)") from None
    try:
        print(f"sim broker: {broker.url} ({broker.kind}, MQTT "
              f"{' and '.join(broker.protocols)}); stop with Ctrl-C or kill {os.getpid()}",
              flush=True)
        stop.wait()
    finally:
        broker.stop()
    return 0


def _run_dataset(args: argparse.Namespace) -> int:
    from agent.errors import ConfigError

    if args.model is not None:
        from agent.dataset import save_dataset
        from firmware_sim.sensors import get_model, make_dataset

        model = get_model(args.model)
        X, y, names = make_dataset(model, args.n_per_class, args.window, args.seed, args.classes)
        path = save_dataset(args.out, X, y, classes=names, channels=model.channels,
                            sample_rate_hz=model.rate_hz)
        shape = f"{len(model.channels)} x {args.window}"
    else:
        from firmware_sim.signals import CLASSES, write_dataset

        try:
            path = write_dataset(args.out, args.n_per_class, args.window, args.classes,
                                 args.seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        names = args.classes or CLASSES
        shape = f"6 x {args.window}"
    print(f"wrote {path}: {args.n_per_class * len(names)} windows of {shape} "
          f"samples, classes {','.join(names)}")
    return 0


def _run_sim(args: argparse.Namespace) -> int:
    if args.scenario is not None:
        return _run_scenario(args)
    from firmware_sim.signals import SAMPLE_RATE_HZ
    from firmware_sim.sim import Simulator

    sim = Simulator(args.broker, args.devices or 1, args.duration or None, prefix=args.prefix,
                    frame_samples=args.frame_samples, speed=args.speed,
                    encoding=args.encoding, seed=args.seed, classes=args.classes,
                    segment_s=tuple(sorted(args.segment)), protocol=args.protocol)
    until = f"for {args.duration:g} s" if args.duration else "until Ctrl-C"
    ids = sim.devices[0] if len(sim.devices) == 1 else f"{sim.devices[0]}..{sim.devices[-1]}"
    print(f"sim: {len(sim.devices)} device(s) ({ids}) -> {sim.broker} "
          f"{args.prefix}/<device>/frames, {args.encoding}, {args.frame_samples} samples/frame "
          f"at {SAMPLE_RATE_HZ * args.speed:g} Hz, {until}", flush=True)
    _report(_wait(sim, protocol=args.protocol))
    return 0


def _wait(sim, duration_s: float = 0.0, protocol: str = "5"):
    """Start `sim` (anything with start/stop/join) and wait: to its end, `duration_s` of
    wall time, or Ctrl-C. Its SimStats. A broker that refuses the connection gets the
    daemon's hint (e.g. --protocol 3.1.1 for a broker that drops MQTT 5 clients)."""
    import time

    from agent.errors import BrokerError
    from agent.mqtt import protocol_hint

    try:
        sim.start()
    except BrokerError as exc:
        hint = protocol_hint(protocol, str(exc))
        if not hint and "refused" in str(exc).lower() and "connack" not in str(exc).lower():
            hint = (" (is a broker listening there? `reverie sim broker --port N` starts one; "
                    "then pass --broker mqtt://127.0.0.1:N)")
        raise BrokerError(f"{exc}{hint}") from None
    deadline = time.monotonic() + duration_s if duration_s > 0 else None
    try:
        stats = None
        while stats is None:
            if deadline is not None and time.monotonic() >= deadline:
                sim.stop()
            stats = sim.join(timeout=0.2)
    except KeyboardInterrupt:
        sim.stop()
        stats = sim.join()
    return stats


def _report(stats) -> None:
    total = sum(stats.frames_sent.values())
    print(f"sim: sent {total} frames ({stats.bytes_sent} bytes) in {stats.elapsed_s:.1f} s, "
          f"{stats.sample_rate_hz:.1f} of {stats.target_sample_rate_hz:g} samples/s per device, "
          f"dropped {stats.frames_dropped}, max lag {stats.max_lag_s * 1000:.0f} ms")
    if stats.frames_dropped:
        print("sim: some frames were dropped (broker connection lost?)", file=sys.stderr)


def _run_scenario(args: argparse.Namespace) -> int:
    import json

    from firmware_sim.runner import ScenarioRunner

    def on_event(ev: dict) -> None:
        detail = {k: v for k, v in ev.items() if k not in ("type", "t_s", "ts")}
        print(f"sim: t={ev['t_s']:.1f} s {ev['type']} {json.dumps(detail)}", flush=True)

    runner = ScenarioRunner(args.scenario, args.broker, prefix=args.prefix,
                            protocol=args.protocol, speed=args.speed, devices=args.devices,
                            encoding=args.encoding, on_event=on_event)
    sc = runner.scenario
    print(f"sim: scenario {sc.name!r} ({sc.description}): {len(runner.devices)} {sc.model} "
          f"device(s) -> {runner.engine.broker} {args.prefix}/<device>/frames, "
          f"{sc.duration_s:g} s at {args.speed:g}x, {runner.rate_hz:g} Hz, "
          f"{sc.frame_samples} samples/frame", flush=True)
    _report(_wait(runner, args.duration, args.protocol))
    print("sim: " + json.dumps(runner.summary()))
    return 0


def _run_replay(args: argparse.Namespace) -> int:
    from firmware_sim.replay import Replay

    replay = Replay(args.data, args.broker, device=args.device, rate_hz=args.rate,
                    frame_samples=args.frame_samples, labels=args.labels,
                    label_delay_s=args.label_delay, loop=args.loop, speed=args.speed,
                    seed=args.seed, prefix=args.prefix, protocol=args.protocol,
                    encoding=args.encoding)
    n, c, t = replay.X.shape
    print(f"sim replay: {args.data}: {n} windows of {c} x {t} as {args.device} -> "
          f"{replay.engine.broker} {replay.topics.frames} at {replay.rate_hz:g} Hz x "
          f"{args.speed:g}{', looping' if args.loop else ''}", flush=True)
    _report(_wait(replay, args.duration, args.protocol))
    print(f"sim replay: {replay.labels_sent} label(s) published")
    return 0
