"""The configuration loader and renderer: TOML file + environment + flags -> `AgentConfig`.

One key table (`KEYS`, ``section.key`` -> type) drives the file parser, the environment
parser (``REVERIE_<SECTION>_<KEY>``, plus the legacy ``REVERIE_BUNDLE``-style aliases) and
`render_config`. Each layer is first flattened into ``{"section.key": typed value}``, the
layers are merged (defaults < file < environment < flags) and only then built into the
dataclasses of `agent.config`, which validate themselves. So a range check lives in one
place, and an error can say where the bad value came from: ``ingest.queue_size=0, expected
>= 1 (from REVERIE_INGEST_QUEUE_SIZE)``.

Secrets: ``broker.password_file`` is read at load time so the password need not sit in the
file; `render_config` masks it.

Placeholders: a string value written ``"<LIKE THIS>"`` in a file (`reverie config example`
writes them where only the operator knows the value) is refused by `load_config` with one
line naming every such key, unless the environment or a flag sets that key.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from agent.config import AgentConfig, BrokerConfig, IngestConfig, SleepSchedule, _need
from agent.errors import ConfigError
from agent.mqtt import BrokerURL, TLSConfig

# ---------------------------------------------------------------------- the key table

class _Key(NamedTuple):
    kind: str               # str | int | float | bool | path | paths | strs
    optional: bool = False  # may be unset (None); an empty environment variable unsets it


_S, _I, _F, _B = _Key("str"), _Key("int"), _Key("float"), _Key("bool")
_OS, _OP = _Key("str", True), _Key("path", True)

KEYS: dict[str, _Key] = {
    "agent.bundle": _OP, "agent.device_id": _OS, "agent.prefix": _S, "agent.agent_id": _OS,
    "agent.state_dir": _OP, "agent.public_keys": _Key("paths"), "agent.threads": _I,
    "agent.learner": _S, "agent.max_learners": _I, "agent.learner_devices": _Key("strs"),
    "agent.allow_bundle_rollback": _B,
    "broker.url": _S, "broker.protocol": _S, "broker.client_id": _OS, "broker.keepalive_s": _I,
    "broker.session_expiry_s": _I, "broker.username": _OS, "broker.password": _OS,
    "broker.password_file": _OP, "broker.ca_file": _OP, "broker.cert_file": _OP,
    "broker.key_file": _OP, "broker.tls_insecure": _B, "broker.reconnect_min_s": _F,
    "broker.reconnect_max_s": _F, "broker.outbox_max": _I,
    "ingest.hop": _Key("int", True), "ingest.queue_size": _I, "ingest.max_batch": _I,
    "ingest.max_payload_bytes": _I, "ingest.reorder_frames": _I, "ingest.max_devices": _I,
    "ingest.history_windows": _I, "ingest.label_wait_s": _F, "ingest.value_range_k": _F,
    "ingest.max_abs_value": _F, "ingest.max_queue_bytes": _I, "ingest.loop_budget_s": _F,
    "sleep.enabled": _B, "sleep.idle_after_s": _F, "sleep.idle_rate_hz": _F,
    "sleep.windows": _Key("strs"), "sleep.max_duration_s": _F, "sleep.budget_s": _F,
    "sleep.min_interval_s": _F, "sleep.min_new_episodes": _I,
    "checkpoint.interval_s": _F,
    "metrics.listen": _OS,
    "health.file": _OP, "health.interval_s": _F,
    "logging.level": _S, "logging.format": _S,
    "commands.from": _S, "commands.key_file": _OP, "commands.max_age_s": _F,
}
SECTIONS = tuple(dict.fromkeys(k.split(".")[0] for k in KEYS))
ENV_VARS = {f"REVERIE_{k.replace('.', '_').upper()}": k for k in KEYS}
LEGACY_ENV = {
    "REVERIE_BUNDLE": "agent.bundle", "REVERIE_BROKER": "broker.url",
    "REVERIE_DEVICE_ID": "agent.device_id", "REVERIE_PREFIX": "agent.prefix",
    "REVERIE_HOP": "ingest.hop", "REVERIE_THREADS": "agent.threads",
    "REVERIE_PROTOCOL": "broker.protocol", "REVERIE_PUBLIC_KEY": "agent.public_keys",
    "REVERIE_STATE_DIR": "agent.state_dir", "REVERIE_LOG_LEVEL": "logging.level",
    "REVERIE_LOG_FORMAT": "logging.format",
}  # REVERIE_HEALTH_FILE is already the name of health.file
CONFIG_ENV = "REVERIE_CONFIG"

# Keys whose dataclass field is named differently; broker credentials and TLS are special.
_FIELD = {"agent.learner": "learner_mode", "checkpoint.interval_s": "checkpoint_interval_s",
          "metrics.listen": "metrics_listen", "health.file": "health_file",
          "health.interval_s": "health_interval_s", "logging.level": "log_level",
          "logging.format": "log_format", "commands.from": "commands_from",
          "commands.key_file": "commands_key_file", "commands.max_age_s": "commands_max_age_s"}
_TLS = {"broker.ca_file": "ca_file", "broker.cert_file": "cert_file",
        "broker.key_file": "key_file", "broker.tls_insecure": "insecure"}
_CREDENTIALS = ("broker.username", "broker.password", "broker.password_file")
_EXPECTED = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
             "path": "a path (string)", "paths": "a list of paths or a comma-separated string",
             "strs": "a list of strings"}


class Placeholder(str):
    """A file value still holding the example's ``"<...>"`` text."""


_PLACEHOLDER = re.compile(r"<[^<>\n]+>")
# Where a placeholder may stand (never a password or a prefix, where "<x>" may be meant).
PLACEHOLDER_KEYS = frozenset(
    [k for k, v in KEYS.items() if v.kind in ("path", "paths")]
    + ["broker.url", "agent.device_id", "agent.agent_id", "broker.client_id"])


def is_placeholder(value: object) -> bool:
    """``"<BUNDLE_DIR>"``-style values (a whole string in angle brackets).

    >>> is_placeholder("<BUNDLE_DIR>"), is_placeholder("bundle/")
    (True, False)
    """
    return isinstance(value, str) and _PLACEHOLDER.fullmatch(value.strip()) is not None


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _user_path(value: str | Path, where: str) -> Path:
    """`value` with ``~`` / ``~user`` expanded; ConfigError naming `where` when it cannot
    be (an unknown user, no home directory)."""
    try:
        return Path(value).expanduser()
    except (RuntimeError, KeyError) as exc:
        raise ConfigError(f"{where}={str(value)!r}: cannot expand '~' ({exc})") from None


def _path(value: str | Path, base: Path | None, key: str) -> Path:
    p = _user_path(value, key)
    return base / p if base is not None and not p.is_absolute() else p


def _typed(key: str, value: object, base: Path | None) -> object:
    """A TOML (or flag) value checked against the key's kind; paths resolved against base."""
    kind = KEYS[key].kind
    ok = {"str": isinstance(value, str),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, int | float) and not isinstance(value, bool),
          "bool": isinstance(value, bool),
          "path": isinstance(value, str | Path),
          "paths": isinstance(value, str | Path) or isinstance(value, list | tuple) and all(
              isinstance(v, str | Path) for v in value),
          "strs": isinstance(value, list | tuple) and all(isinstance(v, str) for v in value),
          }[kind]
    _need(ok, key, value, _EXPECTED[kind])
    if kind == "float":
        return float(value)
    if kind == "path":
        return _path(value, base, key)
    if kind == "paths":
        items = [value] if isinstance(value, str | Path) else value
        return tuple(_path(p, base, key) for v in items
                     for p in (_split(v) if isinstance(v, str) else [v]))
    return tuple(value) if kind == "strs" else value


def _from_env(var: str, key: str, raw: str) -> object:
    kind, optional = KEYS[key]
    if optional and raw.strip() == "":
        return None
    try:
        if kind == "int":
            return int(raw.strip())
        if kind == "float":
            return float(raw.strip())
        if kind == "bool":
            return {"true": True, "1": True, "yes": True, "on": True, "false": False,
                    "0": False, "no": False, "off": False}[raw.strip().lower()]
    except (ValueError, KeyError):
        raise ConfigError(f"{var}={raw!r}, expected {_EXPECTED[kind]} ({key})") from None
    if kind == "path":
        return _user_path(raw, var)
    if kind in ("paths", "strs"):
        return tuple(_user_path(p, var) if kind == "paths" else p for p in _split(raw))
    return raw


def suggest(name: str, known: list[str]) -> str:
    """`` (did you mean X?)`` for the closest of `known`, or ``""``."""
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _read_file(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r}: invalid TOML ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r}: not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None
    except RecursionError:
        raise ConfigError(f"config file {str(path)!r}: nested too deeply") from None
    except ValueError as exc:          # e.g. an integer of more than 4300 digits
        raise ConfigError(f"config file {str(path)!r}: invalid TOML ({exc})") from None
    base, flat = path.absolute().parent, {}
    for section, table in data.items():
        if not isinstance(table, dict):
            home = [k for k in KEYS if k.endswith(f".{section}")]
            hint = f" (did you mean {home[0]}?)" if home else suggest(section, list(SECTIONS))
            raise ConfigError(f"key {section!r} outside any [section] in {path}{hint}")
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}] in {path}"
                              f"{suggest(section, list(SECTIONS))}; known: {', '.join(SECTIONS)}")
        for name, value in table.items():
            key = f"{section}.{name}"
            if key not in KEYS:
                elsewhere = [k for k in KEYS if k.endswith(f".{name}")]
                hint = f" (did you mean {elsewhere[0]}?)" if elsewhere else suggest(key, list(KEYS))
                raise ConfigError(f"unknown key {key} in {path}{hint}")
            if key in PLACEHOLDER_KEYS and (is_placeholder(value) or (
                    isinstance(value, list) and any(is_placeholder(v) for v in value))):
                flat[key] = Placeholder(value if isinstance(value, str) else value[0])
                continue
            try:
                flat[key] = _typed(key, value, base)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (in {path})") from None
    return flat


def _read_env(env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    """``{key: (value, variable)}`` from the REVERIE_* variables; unknown ones are errors."""
    out: dict[str, tuple[object, str]] = {}
    known = sorted(ENV_VARS) + sorted(LEGACY_ENV)
    for var in sorted(env):
        key = ENV_VARS.get(var) or LEGACY_ENV.get(var)
        if key is None:
            rest = var.removeprefix("REVERIE_")
            if var.startswith("REVERIE_") and any(rest.startswith(f"{s.upper()}_") for s in SECTIONS):
                raise ConfigError(f"unknown environment variable {var}{suggest(var, known)}")
            continue
        value = _from_env(var, key, env[var])
        if key in out and out[key][0] != value:
            raise ConfigError(f"{out[key][1]}={env[out[key][1]]!r} and {var}={env[var]!r} both "
                              f"set {key}: set only one")
        out[key] = (value, var)
    return out


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, object] | None = None) -> AgentConfig:
    """The agent's configuration: defaults < TOML file < environment < `overrides`.

    `path` falls back to ``$REVERIE_CONFIG``; without either only the environment and
    `overrides` count. `env` is the environment to read (None: none; the CLI passes
    ``os.environ``). `overrides` maps ``"section.key"`` to flag values (None: not given).
    Relative paths in the file are relative to the file's directory.

    >>> cfg = load_config(env={"REVERIE_BUNDLE": "b", "REVERIE_DEVICE_ID": "+"},
    ...                   overrides={"ingest.queue_size": 100})
    >>> cfg.status_owner, cfg.client_id, cfg.ingest.queue_size
    ('gateway', 'reverie-gateway', 100)
    """
    env = env or {}
    if path is None and env.get(CONFIG_ENV):
        path = env[CONFIG_ENV]
    values: dict[str, object] = {}
    origin: dict[str, tuple[int, str]] = {}  # key -> (layer, where it was set)
    if path is not None:
        file = _user_path(path, CONFIG_ENV if path == env.get(CONFIG_ENV) else "--config")
        for key, value in _read_file(file).items():
            values[key], origin[key] = value, (1, f"in {file}")
    for key, (value, var) in _read_env(env).items():
        values[key], origin[key] = value, (2, f"from {var}")
    for key, value in (overrides or {}).items():
        if key not in KEYS:
            raise ConfigError(f"unknown setting {key!r}{suggest(key, list(KEYS))}")
        if value is not None:
            values[key], origin[key] = _typed(key, value, None), (3, "from the command line")
    held = [f"{key}={str(v)!r}" for key, v in values.items() if isinstance(v, Placeholder)]
    if held:
        where = origin[next(k for k, v in values.items() if isinstance(v, Placeholder))][1]
        raise ConfigError(f"placeholder value(s) from `reverie config example` {where}: "
                          f"{', '.join(held)}: replace each with a real value (or set it by "
                          "flag or REVERIE_* variable)")
    for key, what in (("agent.bundle", "no bundle: pass --bundle DIR, set REVERIE_BUNDLE"),
                      ("agent.device_id", "no device id: pass --device-id ID (or '+' for "
                       "every device), set REVERIE_DEVICE_ID")):
        if values.get(key) is None:
            raise ConfigError(f"{what}, or set {key.split('.')[1]} in the [agent] section "
                              "of the config file")
    try:
        return _build(values, origin)
    except ConfigError as exc:
        m = re.match(r"([a-z]+\.[a-z_]+)", str(exc))
        where = origin.get(m.group(1)) if m else None
        raise ConfigError(f"{exc} ({where[1]})" if where else str(exc)) from None


def _build(values: dict[str, object], origin: dict[str, tuple[int, str]]) -> AgentConfig:
    parts: dict[str, dict[str, object]] = {"agent": {}, "broker": {}, "ingest": {}, "sleep": {}}
    for key, value in values.items():
        if key in _TLS or key in _CREDENTIALS:
            continue
        section, name = key.split(".")
        parts.get(section, parts["agent"])[_FIELD.get(key, name)] = value
    parts["broker"]["url"] = _broker_url(values, origin)
    parts["broker"]["tls"] = TLSConfig(**{f: values[k] for k, f in _TLS.items() if k in values})
    agent = parts.pop("agent")
    return AgentConfig(broker=BrokerConfig(**parts["broker"]), ingest=IngestConfig(**parts["ingest"]),
                       sleep=SleepSchedule(**parts["sleep"]), **agent)


def _broker_url(values: dict[str, object], origin: dict[str, tuple[int, str]]) -> BrokerURL:
    """broker.url with the credential keys applied. A credential key beats what the URL
    embeds unless the URL was set in a higher layer (an env URL beats a file's username)."""
    url = BrokerConfig.url
    if "broker.url" in values:
        try:
            url = BrokerURL.parse(values["broker.url"])
        except ConfigError as exc:
            raise ConfigError(f"broker.url: {exc}") from None
    url_layer = origin.get("broker.url", (0, ""))[0]

    def layer(key: str) -> int:
        return origin[key][0] if values.get(key) is not None else -1

    if layer("broker.password") >= 0 and layer("broker.password") == layer("broker.password_file"):
        raise ConfigError("broker.password and broker.password_file are both set: give one")
    if layer("broker.username") >= (url_layer if url.username else 0):
        url = replace(url, username=values["broker.username"])
    pw_key = max(("broker.password", "broker.password_file"), key=layer)
    if layer(pw_key) >= (url_layer if url.password else 0):
        password = values[pw_key]
        if pw_key == "broker.password_file":
            try:
                password = Path(password).read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError, ValueError) as exc:   # ValueError: NUL in path
                raise ConfigError(f"broker.password_file={str(password)!r}: cannot read "
                                  f"({getattr(exc, 'strerror', None) or exc})") from None
            if not password:
                raise ConfigError(f"broker.password_file={str(values[pw_key])!r} is empty")
        url = replace(url, password=password)
    return url


# ---------------------------------------------------------------------- rendering

def effective_value(config: AgentConfig, key: str) -> object:
    """The value `config` holds for a ``section.key`` of the file (password_file: None)."""
    section, name = key.split(".")
    if key in _TLS:
        return getattr(config.broker.tls, _TLS[key])
    if key in ("broker.username", "broker.password"):
        return getattr(config.broker.url, name)
    if key == "broker.password_file":
        return None
    if key == "broker.url":
        u = config.broker.url
        host = f"[{u.host}]" if ":" in u.host else u.host
        return f"{'mqtts' if u.tls else 'mqtt'}://{host}:{u.port}"
    obj = {"broker": config.broker, "ingest": config.ingest, "sleep": config.sleep}.get(
        section, config)
    return getattr(obj, _FIELD.get(key, name))


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    # JSON string escapes are valid TOML, except that TOML also forbids a raw DEL.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def render_config(config: AgentConfig, *, mask_secrets: bool = True) -> str:
    """`config` as a TOML file (unset keys commented out); loading it gives `config` back
    (with ``mask_secrets=False``: the password is written as ``***`` otherwise)."""
    lines: list[str] = []
    for key in KEYS:
        section, name = key.split(".")
        if f"[{section}]" not in lines:
            lines += ["", f"[{section}]"] if lines else [f"[{section}]"]
        value = effective_value(config, key)
        if value is None:
            if key != "broker.password_file":
                lines.append(f"# {name} = (not set)")
        elif key == "broker.password" and mask_secrets:
            lines.append(f'{name} = "***"')
        else:
            lines.append(f"{name} = {_toml(value)}")
        if key == "agent.agent_id" and value is None:
            lines.append(f"#   status topic owner: {config.status_owner}")
        if key == "broker.client_id" and value is None:
            lines.append(f"#   client id used: {config.client_id}")
    return "\n".join(lines) + "\n"
