"""``reverie run`` and ``reverie health``: the device runtime's own subcommands.

Every flag of ``run`` can also come from the environment (``REVERIE_BUNDLE``,
``REVERIE_BROKER``, ``REVERIE_DEVICE_ID``, ...), which is how the Docker image and the
systemd unit configure it; a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from agent.errors import ConfigError


def _env(name: str, default=None):
    return os.environ.get(f"REVERIE_{name}", default)


def _int_env(name: str, default: int | None) -> int | None:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"REVERIE_{name}={raw!r}, expected an integer") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the agent daemon on an MQTT broker",
                       description="Subscribe to {prefix}/{device}/frames, window the samples, "
                       "run the bundle's model and publish {prefix}/{device}/predictions.")
    p.add_argument("--bundle", default=None, help="bundle directory [REVERIE_BUNDLE]")
    p.add_argument("--broker", default=None,
                   help="broker URL, mqtt://HOST:PORT [REVERIE_BROKER, default mqtt://127.0.0.1:1883]")
    p.add_argument("--device-id", default=None,
                   help="device to serve, or '+' for every device (gateway) [REVERIE_DEVICE_ID]")
    p.add_argument("--prefix", default=None, help="topic prefix [REVERIE_PREFIX, default reverie/v1]")
    p.add_argument("--hop", type=int, default=None,
                   help="samples between window starts [REVERIE_HOP, default: window length]")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime intra-op threads [REVERIE_THREADS, default 1]")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default=None,
                   help="MQTT protocol version [REVERIE_PROTOCOL, default 5]")
    p.add_argument("--health-file", default=None,
                   help="heartbeat file for `reverie health` [REVERIE_HEALTH_FILE]")
    p.add_argument("--public-key", action="append", default=None, metavar="PATH",
                   help="trusted ed25519 public key: the bundle must be signed by one of "
                   "them (repeat, or separate with commas, to trust several while keys "
                   "rotate) [REVERIE_PUBLIC_KEY]")
    p.add_argument("--state-dir", default=None,
                   help="the learner's checkpoints and write-ahead log [REVERIE_STATE_DIR]")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default=_env("LOG_FORMAT", "text"), choices=["text", "json"])
    p.set_defaults(func=cmd_run)

    h = sub.add_parser("health", help="exit 0 if the local daemon is healthy (Docker HEALTHCHECK)")
    h.add_argument("--health-file", default=None, help="[REVERIE_HEALTH_FILE]")
    h.add_argument("--max-age", type=float, default=30.0,
                   help="seconds after which a silent daemon counts as stalled")
    h.set_defaults(func=cmd_health)


def config_from_args(args: argparse.Namespace):
    from agent.daemon import DaemonConfig
    from agent.mqtt import BrokerURL
    from agent.topics import DEFAULT_PREFIX

    bundle = args.bundle or _env("BUNDLE")
    if not bundle:
        raise ConfigError("no bundle: pass --bundle DIR or set REVERIE_BUNDLE")
    device = args.device_id or _env("DEVICE_ID")
    if not device:
        raise ConfigError("no device id: pass --device-id ID (or '+') or set REVERIE_DEVICE_ID")
    health = args.health_file or _env("HEALTH_FILE")
    state_dir = args.state_dir or _env("STATE_DIR")
    return DaemonConfig(
        bundle=Path(bundle),
        broker=BrokerURL.parse(args.broker or _env("BROKER", "mqtt://127.0.0.1:1883")),
        device_id=device,
        prefix=args.prefix or _env("PREFIX", DEFAULT_PREFIX),
        hop_samples=args.hop if args.hop is not None else _int_env("HOP", None),
        threads=args.threads if args.threads is not None else _int_env("THREADS", 1),
        protocol=args.protocol or _env("PROTOCOL", "5"),
        health_file=Path(health) if health else None,
        state_dir=Path(state_dir) if state_dir else None,
        public_keys=_public_keys(args.public_key or [_env("PUBLIC_KEY", "")]),
    )


def _public_keys(values: list[str]) -> tuple[Path, ...]:
    return tuple(Path(p.strip()) for v in values for p in v.split(",") if p.strip())


def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon import Daemon
    from agent.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    config = config_from_args(args)
    return Daemon(config).run_forever()


def cmd_health(args: argparse.Namespace) -> int:
    from agent.daemon import check_health

    path = args.health_file or _env("HEALTH_FILE")
    if not path:
        raise ConfigError("no health file: pass --health-file or set REVERIE_HEALTH_FILE")
    ok, detail = check_health(Path(path), args.max_age)
    print(("healthy: " if ok else "unhealthy: ") + detail, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
