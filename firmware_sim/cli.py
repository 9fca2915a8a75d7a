"""``reverie sim``: simulated devices over MQTT, and ``reverie sim dataset``: a training set.

Registered through the ``reverie.commands`` entry point (pyproject.toml). Importing this
module stays cheap: numpy, paho and the simulator load only when a command runs.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"

EPILOG = """\
modes:
  reverie sim [options]               stream frames from simulated devices until --duration
                                      has passed (or Ctrl-C); prints stats at the end
  reverie sim dataset --out D.npz     write a labelled dataset of independent windows of
                                      the same signal classes, for `reverie export`

examples:
  reverie sim --devices 3 --duration 30 --speed 2
  reverie sim --broker mqtt://gateway:1883 --encoding binary --classes idle,walk,run
  reverie sim dataset --out data/imu.npz --n-per-class 300 --classes idle,walk,run,stairs
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
        "sim", help="simulated IMU devices publishing frames over MQTT (or: sim dataset)",
        description="Simulated 6-channel IMU devices (50 Hz) publishing sensor frames to "
                    "{prefix}/{device}/frames, each switching between activity classes "
                    "at random.",
        usage="reverie sim [options]\n       reverie sim dataset --out D.npz [options]",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default=DEFAULT_BROKER, metavar="URL",
                   help=f"MQTT broker URL (default: {DEFAULT_BROKER})")
    p.add_argument("--devices", type=_positive(int), default=1, metavar="N",
                   help="number of devices, ids sim-000, sim-001, ... (default: 1)")
    p.add_argument("--duration", type=float, default=0.0, metavar="S",
                   help="wall-clock seconds to run; 0 runs until Ctrl-C (default: 0)")
    p.add_argument("--speed", type=_positive(float), default=1.0, metavar="X",
                   help="time scale: X times real time (default: 1)")
    p.add_argument("--encoding", choices=("json", "binary"), default="json",
                   help="frame encoding (default: json)")
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
    d = modes.add_parser("dataset", help="write a labelled NPZ dataset and exit",
                         description="Write independent windows of the simulator's signal "
                                     "classes in the NPZ dataset format (X: N x 6 x window).")
    d.add_argument("--out", required=True, metavar="D.npz", help="output file")
    d.add_argument("--n-per-class", type=_positive(int), default=200, metavar="N",
                   help="windows per class (default: 200)")
    d.add_argument("--window", type=_positive(int), default=128, metavar="T",
                   help="samples per window (default: 128)")
    d.add_argument("--classes", type=_classes, default=None, metavar="A,B,..",
                   help="classes to include, in this order (default: all)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    d.set_defaults(func=_run_dataset)


def _run_dataset(args: argparse.Namespace) -> int:
    from agent.errors import ConfigError
    from firmware_sim.signals import CLASSES, write_dataset

    try:
        path = write_dataset(args.out, args.n_per_class, args.window, args.classes, args.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    names = args.classes or CLASSES
    print(f"wrote {path}: {args.n_per_class * len(names)} windows of 6 x {args.window} "
          f"samples, classes {','.join(names)}")
    return 0


def _run_sim(args: argparse.Namespace) -> int:
    from firmware_sim.signals import SAMPLE_RATE_HZ
    from firmware_sim.sim import Simulator

    sim = Simulator(args.broker, args.devices, args.duration or None, prefix=args.prefix,
                    frame_samples=args.frame_samples, speed=args.speed,
                    encoding=args.encoding, seed=args.seed, classes=args.classes,
                    segment_s=tuple(sorted(args.segment)), protocol=args.protocol)
    until = f"for {args.duration:g} s" if args.duration else "until Ctrl-C"
    ids = sim.devices[0] if len(sim.devices) == 1 else f"{sim.devices[0]}..{sim.devices[-1]}"
    print(f"sim: {len(sim.devices)} device(s) ({ids}) -> {sim.broker} "
          f"{args.prefix}/<device>/frames, {args.encoding}, {args.frame_samples} samples/frame "
          f"at {SAMPLE_RATE_HZ * args.speed:g} Hz, {until}", flush=True)
    sim.start()
    try:
        stats = None
        while stats is None:
            stats = sim.join(timeout=0.5)
    except KeyboardInterrupt:
        sim.stop()
        stats = sim.join()
    total = sum(stats.frames_sent.values())
    print(f"sim: sent {total} frames ({stats.bytes_sent} bytes) in {stats.elapsed_s:.1f} s, "
          f"{stats.sample_rate_hz:.1f} of {stats.target_sample_rate_hz:g} samples/s per device, "
          f"dropped {stats.frames_dropped}, max lag {stats.max_lag_s * 1000:.0f} ms")
    if stats.frames_dropped:
        print("sim: some frames were dropped (broker connection lost?)", file=sys.stderr)
    return 0
