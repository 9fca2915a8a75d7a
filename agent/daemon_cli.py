"""``reverie run``, ``reverie health`` and ``reverie config``: the device runtime's subcommands.

``run`` loads one `AgentConfig` (agent/config.py) from a TOML file (``--config`` or
``REVERIE_CONFIG``), the ``REVERIE_*`` environment (how the Docker image and the systemd
unit configure it) and its flags, in that order of precedence, and hands it to the daemon.
``config check`` shows what that configuration resolves to without starting anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from pathlib import Path

from agent.errors import ConfigError

EXAMPLE = "data/agent.example.toml"  # inside the `agent` package

# flag dest -> config key; a flag left at None is "not given"
_FLAG_KEYS = {
    "bundle": "agent.bundle", "broker": "broker.url", "device_id": "agent.device_id",
    "prefix": "agent.prefix", "hop": "ingest.hop", "threads": "agent.threads",
    "protocol": "broker.protocol", "state_dir": "agent.state_dir",
    "health_file": "health.file", "public_key": "agent.public_keys",
    "metrics": "metrics.listen", "learner": "agent.learner",
    "log_level": "logging.level", "log_format": "logging.format",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the agent daemon on an MQTT broker",
                       description="Subscribe to {prefix}/{device}/frames, window the samples, "
                       "run the bundle's model and publish {prefix}/{device}/predictions. "
                       "Settings come from --config FILE (see `reverie config example`), then "
                       "REVERIE_<SECTION>_<KEY> variables, then these flags.")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="TOML configuration file [REVERIE_CONFIG]")
    p.add_argument("--bundle", help="bundle directory [REVERIE_BUNDLE]")
    p.add_argument("--broker", metavar="URL",
                   help="broker URL, mqtt://HOST:PORT [REVERIE_BROKER, default mqtt://127.0.0.1:1883]")
    p.add_argument("--device-id",
                   help="device to serve, or '+' for every device (gateway) [REVERIE_DEVICE_ID]")
    p.add_argument("--prefix", help="topic prefix [REVERIE_PREFIX, default reverie/v1]")
    p.add_argument("--hop", type=int,
                   help="samples between window starts [REVERIE_HOP, default: window length]")
    p.add_argument("--threads", type=int,
                   help="onnxruntime intra-op threads [REVERIE_THREADS, default 1]")
    p.add_argument("--protocol", choices=["5", "3.1.1"],
                   help="MQTT protocol version [REVERIE_PROTOCOL, default 5]")
    p.add_argument("--state-dir",
                   help="the learner's checkpoints and write-ahead log [REVERIE_STATE_DIR]")
    p.add_argument("--health-file",
                   help="heartbeat file for `reverie health` [REVERIE_HEALTH_FILE]")
    p.add_argument("--public-key", action="append", metavar="PATH",
                   help="trusted ed25519 public key: the bundle must be signed by one of "
                   "them (repeat, or separate with commas, to trust several while keys "
                   "rotate) [REVERIE_PUBLIC_KEY]")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus /metrics here [REVERIE_METRICS_LISTEN, default off]")
    p.add_argument("--learner", choices=["shared", "per_device"],
                   help="gateway: one learner for all devices, or one per device "
                   "[REVERIE_AGENT_LEARNER, default shared]")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="[REVERIE_LOG_LEVEL, default info]")
    p.add_argument("--log-format", choices=["text", "json"],
                   help="[REVERIE_LOG_FORMAT, default text]")
    p.set_defaults(func=cmd_run)

    h = sub.add_parser("health", help="exit 0 if the local daemon is healthy (Docker HEALTHCHECK)")
    h.add_argument("--health-file", default=None, help="[REVERIE_HEALTH_FILE]")
    h.add_argument("--max-age", type=float, default=30.0,
                   help="seconds after which a silent daemon counts as stalled")
    h.set_defaults(func=cmd_health)

    c = sub.add_parser("config", help="check the agent's configuration, or print an example")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    check = csub.add_parser(
        "check", help="validate a config file with the current environment and print the "
        "effective configuration (passwords masked); exit 2 on an error")
    check.add_argument("file", nargs="?", default=None,
                       help="TOML configuration file [REVERIE_CONFIG; none: environment only]")
    check.set_defaults(func=cmd_config_check)
    example = csub.add_parser("example", help="print a commented example configuration file")
    example.set_defaults(func=cmd_config_example)
    unit = csub.add_parser("systemd-unit", help="print the systemd unit (Type=notify, watchdog)")
    unit.set_defaults(func=cmd_config_unit)


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The flags given on the command line, keyed ``section.key``."""
    return {key: getattr(args, dest) for dest, key in _FLAG_KEYS.items()
            if getattr(args, dest, None) is not None}


def config_from_args(args: argparse.Namespace):
    from agent.config import load_config

    return load_config(args.config, env=os.environ, overrides=overrides_from_args(args))


def _public_keys(values: list[str]) -> tuple[Path, ...]:
    """``--public-key`` values, each possibly comma-separated, as paths."""
    return tuple(Path(p.strip()) for v in values for p in v.split(",") if p.strip())


def cmd_run(args: argparse.Namespace) -> int:
    from agent.logs import setup_logging

    config = config_from_args(args)
    setup_logging(config.log_level, config.log_format)
    from agent.daemon import run_daemon  # the daemon pulls in numpy, onnxruntime, paho

    return run_daemon(config)


def cmd_health(args: argparse.Namespace) -> int:
    from agent.daemon import check_health

    path = args.health_file or os.environ.get("REVERIE_HEALTH_FILE")
    if not path:
        raise ConfigError("no health file: pass --health-file or set REVERIE_HEALTH_FILE")
    ok, detail = check_health(Path(path), args.max_age)
    print(("healthy: " if ok else "unhealthy: ") + detail, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_config_check(args: argparse.Namespace) -> int:
    from agent.config import load_config, render_config

    config = load_config(args.file, env=os.environ)
    source = args.file or os.environ.get("REVERIE_CONFIG") or "(no file)"
    print(f"# reverie: effective configuration: {source} + REVERIE_* environment")
    print(render_config(config, mask_secrets=True), end="")
    return 0


def cmd_config_unit(args: argparse.Namespace) -> int:
    print(resources.files("agent").joinpath("data/reverie.service").read_text(encoding="utf-8"),
          end="")
    return 0


def example_text() -> str:
    """The commented example configuration shipped inside the package."""
    return resources.files("agent").joinpath(EXAMPLE).read_text(encoding="utf-8")


def cmd_config_example(args: argparse.Namespace) -> int:
    print(example_text(), end="")
    return 0
