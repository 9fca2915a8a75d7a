"""``reverie run``, ``reverie health`` and ``reverie config``: the device runtime's subcommands.

``run`` loads one `AgentConfig` (agent/config.py) from a TOML file (``--config`` or
``REVERIE_CONFIG``), the ``REVERIE_*`` environment (how the Docker image and the systemd
unit configure it) and its flags, in that order of precedence, and hands it to the daemon.
``config check`` shows what that configuration resolves to without starting anything, and
checks the files and directories it names (what it cannot check, it says).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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
    "allow_bundle_rollback": "agent.allow_bundle_rollback",
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
    p.add_argument("--allow-bundle-rollback", action="store_const", const=True, default=None,
                   help="accept a bundle older than the newest one this state directory ran "
                        "(anti-rollback override) [REVERIE_AGENT_ALLOW_BUNDLE_ROLLBACK]")
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
                   help="seconds after which a silent daemon counts as stalled (default 30)")
    h.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for the daemon to be healthy (started and "
                   "connected), e.g. right after starting it (default 0: check once)")
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
    example = csub.add_parser(
        "example", help="print a commented example configuration file",
        description="Print the commented example configuration. Values only you know are "
        "placeholders (\"<BUNDLE_DIR>\"): `config check` lists them and `run` refuses them. "
        "These flags fill them in (paths made absolute).")
    example.add_argument("--bundle", metavar="DIR", help="agent.bundle")
    example.add_argument("--broker", metavar="URL", help="broker.url, mqtt://HOST:PORT")
    example.add_argument("--state-dir", metavar="DIR", help="agent.state_dir")
    example.add_argument("--device-id", metavar="ID", help="agent.device_id (default '+')")
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
    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        ok, detail = check_health(Path(path), args.max_age)
        if ok or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    waited = f" after waiting {args.wait:g} s" if args.wait > 0 and not ok else ""
    print(("healthy: " if ok else "unhealthy: ") + detail + waited,
          file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_config_check(args: argparse.Namespace) -> int:
    from agent.config import load_config, render_config

    config = load_config(args.file, env=os.environ)
    source = args.file or os.environ.get("REVERIE_CONFIG") or "(no file)"
    print(f"# reverie: effective configuration: {source} + REVERIE_* environment")
    print(render_config(config, mask_secrets=True), end="")
    ok, problems, unchecked = check_paths(config)
    print("\n# checks")
    for line in ok:
        print(f"#   ok: {line}")
    for line in unchecked:
        print(f"#   not checked: {line}")
    for line in problems:
        print(f"reverie config check: error: {line}", file=sys.stderr)
    return 2 if problems else 0


def _writable_dir(path: Path, key: str, problems: list[str], ok: list[str]) -> None:
    """`path` is (or can be created as) a directory this process may write."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe == path and not path.is_dir():
        problems.append(f"{key}={str(path)!r}: exists but is not a directory")
    elif not os.access(probe, os.W_OK | os.X_OK):
        problems.append(f"{key}={str(path)!r}: {probe} is not writable by this user "
                        "(run as the daemon's user, or choose another directory)")
    else:
        ok.append(f"{key} = {path} ({'exists, writable' if probe == path else 'will be created'})")


def _readable_file(path: Path, key: str, problems: list[str], ok: list[str]) -> bool:
    if not path.exists():
        problems.append(f"{key}={str(path)!r}: does not exist")
    elif not path.is_file():
        problems.append(f"{key}={str(path)!r}: not a file")
    elif not os.access(path, os.R_OK):
        problems.append(f"{key}={str(path)!r}: not readable by this user")
    else:
        ok.append(f"{key} = {path} (readable)")
        return True
    return False


def check_paths(config) -> tuple[list[str], list[str], list[str]]:
    """What `reverie run` would find on disk: ``(ok, problems, not checked)``, one line
    each. The bundle is loaded as the daemon loads it (hashes, and the signature when
    public keys are set)."""
    from agent.bundle import load_bundle
    from agent.errors import ReverieError

    ok: list[str] = []
    problems: list[str] = []
    keys_ok = all([_readable_file(k, "agent.public_keys", problems, ok)
                   for k in config.public_keys])
    if keys_ok:
        try:
            b = load_bundle(config.bundle, public_keys=config.public_keys or None)
        except (ReverieError, OSError) as exc:
            problems.append(f"agent.bundle={str(config.bundle)!r}: {exc}")
        else:
            signed = f"signed by {b.signed_by}" if b.signed_by else "signature not required"
            ok.append(f"agent.bundle = {config.bundle} (bundle {b.bundle_id}, classes "
                      f"{','.join(b.classes)}, hashes verified, {signed})")
    else:
        problems.append(f"agent.bundle={str(config.bundle)!r}: not checked (a public key "
                        "above cannot be read)")
    if config.state_dir is not None:
        _writable_dir(config.state_dir, "agent.state_dir", problems, ok)
    if config.health_file is not None:
        _writable_dir(config.health_file.parent, "health.file's directory", problems, ok)
    tls = config.broker.tls
    for name in ("ca_file", "cert_file", "key_file"):
        if getattr(tls, name) is not None:
            _readable_file(getattr(tls, name), f"broker.{name}", problems, ok)
    key = config.commands_key_file
    if key is not None and _readable_file(key, "commands.key_file", problems, ok):
        if len(key.read_bytes().strip()) < 16:
            problems.append(f"commands.key_file={str(key)!r}: shorter than 16 bytes")
    unchecked = [f"broker.url {config.broker.url}: whether the broker is reachable and "
                 "accepts these credentials (`reverie run` says within 5 s)"]
    if config.metrics_listen:
        unchecked.append(f"metrics.listen {config.metrics_listen}: whether the port is free")
    return ok, problems, unchecked


def cmd_config_unit(args: argparse.Namespace) -> int:
    print(resources.files("agent").joinpath("data/reverie.service").read_text(encoding="utf-8"),
          end="")
    return 0


def example_text() -> str:
    """The commented example configuration shipped inside the package."""
    return resources.files("agent").joinpath(EXAMPLE).read_text(encoding="utf-8")


def fill_example(text: str, values: dict[str, str]) -> str:
    """`text` (the example) with the ``section.key`` lines of `values` (strings) set to
    them. JSON string escapes are valid TOML basic strings."""
    section, out, todo = "", [], dict(values)
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1]
        name = stripped.lstrip("# ").split(" = ", 1)[0] if " = " in stripped else None
        key = f"{section}.{name}"
        if name and key in todo and not stripped.startswith("#   "):
            line = f"{name} = {json.dumps(str(todo.pop(key)))}\n"
        out.append(line)
    assert not todo, f"example lacks {sorted(todo)}"   # a key renamed in the example
    return "".join(out)


def cmd_config_example(args: argparse.Namespace) -> int:
    values = {}
    for dest, key, is_path in (("bundle", "agent.bundle", True),
                               ("broker", "broker.url", False),
                               ("state_dir", "agent.state_dir", True),
                               ("device_id", "agent.device_id", False)):
        value = getattr(args, dest, None)
        if value is not None:
            values[key] = str(Path(value).expanduser().absolute()) if is_path else value
    print(fill_example(example_text(), values), end="")
    return 0
