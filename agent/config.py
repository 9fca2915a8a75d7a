"""The agent's configuration: frozen dataclasses, loaded once from TOML + environment + flags.

This module holds the dataclasses (`AgentConfig` composed of `BrokerConfig`, `IngestConfig`,
`SleepSchedule`), which validate themselves, so a range check lives in one place. The
loader and renderer (`load_config`, `render_config`, `effective_value`, the key table
`KEYS`) live in `agent.config_file` and are re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError
from agent.metrics import parse_listen
from agent.mqtt import BrokerURL, TLSConfig
from agent.protocol import MAX_PAYLOAD_BYTES
from agent.topics import DEFAULT_PREFIX, WILDCARD_DEVICE, Topics, validate_device_id

LOG_LEVELS = ("debug", "info", "warning", "error")


def _need(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}, expected {expected}")


def _count(key: str, value: object, lo: int = 1) -> None:
    _need(isinstance(value, int) and not isinstance(value, bool), key, value,
          f"an integer >= {lo}")
    _need(value >= lo, key, value, f">= {lo}")


def _seconds(obj: object, name: str, key: str, *, zero_ok: bool = False) -> None:
    """Check field `name` (file key `key`) is a finite number > 0 (>= 0 with zero_ok) and
    store it as a float."""
    v = getattr(obj, name)
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    _need(ok and (v >= 0 if zero_ok else v > 0), key, v,
          "a number >= 0" if zero_ok else "a number > 0")
    object.__setattr__(obj, name, float(v))


def parse_window(spec: str) -> tuple[int, int]:
    """A daily window ``"HH:MM-HH:MM"`` (local time) as minutes since midnight.

    The end may be before the start (the window wraps midnight) and may be ``24:00``.

    >>> parse_window("02:00-04:00"), parse_window("23:30-00:15"), parse_window("20:00-24:00")
    ((120, 240), (1410, 15), (1200, 1440))
    """
    from agent.scheduler import parse_window as parse  # one parser: the scheduler's

    try:
        start, end = parse(spec.strip() if isinstance(spec, str) else spec)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if start == end % 1440:
        raise ConfigError(f"sleep window {spec!r}: start equals end (empty or the whole day?)")
    return start, end


@dataclass(frozen=True)
class BrokerConfig:
    url: BrokerURL = BrokerURL("127.0.0.1", 1883)   # username/password may come from the URL
    protocol: str = "5"                # "5" or "3.1.1"
    client_id: str | None = None       # None: "reverie-<agent id>" (stable, so the persistent session survives restarts)
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 86400  # MQTT 5 session expiry; 3.1.1: clean session off when > 0
    tls: TLSConfig = TLSConfig()
    reconnect_min_s: float = 0.25
    reconnect_max_s: float = 1.5     # short: back within 2 s of the broker's return
    outbox_max: int = 10_000           # outgoing messages buffered while offline

    def __post_init__(self) -> None:
        if isinstance(self.url, str):
            try:
                object.__setattr__(self, "url", BrokerURL.parse(self.url))
            except ConfigError as exc:
                raise ConfigError(f"broker.url: {exc}") from None
        _need(isinstance(self.url, BrokerURL), "broker.url", self.url, "mqtt://HOST[:PORT]")
        _need(isinstance(self.tls, TLSConfig), "broker.tls", self.tls, "a TLSConfig")
        if self.url.password and not self.url.username:
            raise ConfigError("broker.password is set but no user name: set broker.username "
                              "or put it in broker.url (mqtt://USER@HOST)")
        if not self.url.tls and (self.tls.ca_file or self.tls.cert_file):
            raise ConfigError(f"broker.ca_file/cert_file are set but broker.url="
                              f"{str(self.url)!r} is plain MQTT: use mqtts://")
        _need(self.protocol in ("5", "3.1.1"), "broker.protocol", self.protocol, "'5' or '3.1.1'")
        _need(self.client_id is None or (isinstance(self.client_id, str) and self.client_id != ""),
              "broker.client_id", self.client_id, "a non-empty string")
        _count("broker.keepalive_s", self.keepalive_s)
        _count("broker.session_expiry_s", self.session_expiry_s, 0)
        _count("broker.outbox_max", self.outbox_max)
        _seconds(self, "reconnect_min_s", "broker.reconnect_min_s")
        _seconds(self, "reconnect_max_s", "broker.reconnect_max_s")
        _need(self.reconnect_min_s <= self.reconnect_max_s, "broker.reconnect_min_s",
              self.reconnect_min_s, f"<= broker.reconnect_max_s ({self.reconnect_max_s})")


@dataclass(frozen=True)
class IngestConfig:
    hop: int | None = None             # samples between window starts; None: window length
    queue_size: int = 4096
    max_batch: int = 64
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    reorder_frames: int = 4            # out-of-order frames held per device before a gap is declared
    max_devices: int = 1000
    history_windows: int = 1024        # recent windows kept per device so labels can refer to them
    label_wait_s: float = 5.0          # a label for a window not yet seen waits this long
    value_range_k: float = 1000.0      # a sample value beyond mean +- k*std (the bundle's training statistics) is refused
    max_abs_value: float = 1e6         # |value| above this is refused (also without training statistics)
    max_queue_bytes: int = 64 << 20    # payload bytes queued for the worker (frames + labels/commands)
    loop_budget_s: float = 0.5         # the worker's control messages stop for frames after this long per loop

    def __post_init__(self) -> None:
        if self.hop is not None:
            _count("ingest.hop", self.hop)
        for name in ("queue_size", "max_batch", "max_payload_bytes", "max_devices",
                     "history_windows"):
            _count(f"ingest.{name}", getattr(self, name))
        _count("ingest.reorder_frames", self.reorder_frames, 0)
        _seconds(self, "label_wait_s", "ingest.label_wait_s", zero_ok=True)
        _seconds(self, "value_range_k", "ingest.value_range_k")
        _seconds(self, "max_abs_value", "ingest.max_abs_value")
        _count("ingest.max_queue_bytes", self.max_queue_bytes, self.max_payload_bytes)
        _seconds(self, "loop_budget_s", "ingest.loop_budget_s")


@dataclass(frozen=True)
class SleepSchedule:
    enabled: bool = True
    idle_after_s: float = 60.0         # no frames for this long: idle
    idle_rate_hz: float = 0.0          # or frame rate (frames/s over the last idle_after_s) at or below this
    windows: tuple[str, ...] = ()      # scheduled windows, "HH:MM-HH:MM" local time (may wrap midnight)
    max_duration_s: float = 300.0      # one sleep never runs longer
    budget_s: float = 60.0             # consolidation budget passed to Learner.sleep
    min_interval_s: float = 600.0      # between the end of one sleep and the next automatic one
    min_new_episodes: int = 1          # do not sleep if the memory learned nothing new since the last

    def __post_init__(self) -> None:
        _need(isinstance(self.enabled, bool), "sleep.enabled", self.enabled, "true or false")
        windows = (self.windows,) if isinstance(self.windows, str) else tuple(self.windows)
        object.__setattr__(self, "windows", windows)
        for spec in windows:
            try:
                parse_window(spec)
            except ConfigError as exc:
                raise ConfigError(f"sleep.windows: {exc}") from None
        for name in ("idle_after_s", "max_duration_s", "budget_s"):
            _seconds(self, name, f"sleep.{name}")
        _seconds(self, "idle_rate_hz", "sleep.idle_rate_hz", zero_ok=True)
        _seconds(self, "min_interval_s", "sleep.min_interval_s", zero_ok=True)
        _need(self.budget_s <= self.max_duration_s, "sleep.budget_s", self.budget_s,
              f"<= sleep.max_duration_s ({self.max_duration_s})")
        _count("sleep.min_new_episodes", self.min_new_episodes, 0)


@dataclass(frozen=True)
class AgentConfig:
    bundle: Path
    device_id: str                     # a device id, or "+" (gateway: every device under the prefix)
    prefix: str = DEFAULT_PREFIX
    agent_id: str | None = None        # owner of the status topic; default: device id, or "gateway"
    state_dir: Path | None = None
    public_keys: tuple[Path, ...] = ()
    threads: int = 1
    learner_mode: str = "shared"       # gateway: "shared" (one learner) or "per_device"
    broker: BrokerConfig = BrokerConfig()
    ingest: IngestConfig = IngestConfig()
    sleep: SleepSchedule = SleepSchedule()
    checkpoint_interval_s: float = 300.0
    metrics_listen: str | None = None  # "HOST:PORT" serves Prometheus /metrics; None: off
    health_file: Path | None = None
    health_interval_s: float = 5.0
    log_level: str = "info"
    log_format: str = "text"           # "text" or "json"
    commands_from: str = "any"         # state-changing commands: "any" served device's cmd topic, or only the "agent"'s own
    commands_key_file: Path | None = None  # HMAC-SHA256 key: state-changing commands must be signed
    commands_max_age_s: float = 300.0  # a signed command's "ts" may be this old (or this far ahead)
    max_learners: int = 64             # gateway, learner = "per_device": learners (state dirs) at most
    learner_devices: tuple[str, ...] = ()  # gateway, per_device: only these devices get a learner (empty: any)
    allow_bundle_rollback: bool = False    # accept a bundle older than the newest this state dir ran

    def __post_init__(self) -> None:
        for name in ("bundle", "state_dir", "health_file", "commands_key_file"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        _need(self.bundle is not None, "agent.bundle", self.bundle, "a bundle directory")
        keys = self.public_keys
        keys = (keys,) if isinstance(keys, str | Path) else keys
        object.__setattr__(self, "public_keys", tuple(Path(p) for p in keys))
        for key, value, check in (
                ("agent.device_id", self.device_id,
                 lambda v: validate_device_id(v, allow_wildcard=True)),
                ("agent.prefix", self.prefix, lambda v: Topics(WILDCARD_DEVICE, v)),
                ("agent.agent_id", self.agent_id, lambda v: v is None or validate_device_id(v))):
            try:
                check(value)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{key}={value!r}: {exc}") from None
        _count("agent.threads", self.threads)
        _need(self.learner_mode in ("shared", "per_device"), "agent.learner", self.learner_mode,
              "'shared' or 'per_device'")
        for name, cls in (("broker", BrokerConfig), ("ingest", IngestConfig),
                          ("sleep", SleepSchedule)):
            _need(isinstance(getattr(self, name), cls), name, getattr(self, name), cls.__name__)
        _seconds(self, "checkpoint_interval_s", "checkpoint.interval_s")
        _need(self.commands_from in ("any", "agent"), "commands.from", self.commands_from,
              "'any' (every served device's cmd topic) or 'agent' (only the agent's own)")
        _seconds(self, "commands_max_age_s", "commands.max_age_s")
        _count("agent.max_learners", self.max_learners)
        devices = self.learner_devices
        devices = (devices,) if isinstance(devices, str) else tuple(devices)
        object.__setattr__(self, "learner_devices", devices)
        for d in devices:
            try:
                validate_device_id(d)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"agent.learner_devices: {d!r}: {exc}") from None
        _need(isinstance(self.allow_bundle_rollback, bool), "agent.allow_bundle_rollback",
              self.allow_bundle_rollback, "true or false")
        _seconds(self, "health_interval_s", "health.interval_s")
        if self.metrics_listen is not None:
            try:
                parse_listen(self.metrics_listen)
            except ConfigError as exc:
                raise ConfigError(f"metrics.listen={self.metrics_listen!r}: {exc}") from None
        if isinstance(self.log_level, str):
            object.__setattr__(self, "log_level", self.log_level.lower())
        _need(self.log_level in LOG_LEVELS, "logging.level", self.log_level, " or ".join(LOG_LEVELS))
        _need(self.log_format in ("text", "json"), "logging.format", self.log_format,
              "'text' or 'json'")

    @property
    def status_owner(self) -> str:
        if self.agent_id:
            return self.agent_id
        return "gateway" if self.device_id == WILDCARD_DEVICE else self.device_id

    @property
    def client_id(self) -> str:
        return self.broker.client_id or f"reverie-{self.status_owner}"

    @property
    def topics(self) -> Topics:
        return Topics(self.device_id, self.prefix)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return None if self.metrics_listen is None else parse_listen(self.metrics_listen)


# agent.config_file imports this module, so its names are re-exported on first use.
_LOADER_NAMES = frozenset({"CONFIG_ENV", "ENV_VARS", "KEYS", "LEGACY_ENV", "SECTIONS",
                           "effective_value", "load_config", "render_config"})


def __getattr__(name: str) -> object:
    if name in _LOADER_NAMES:
        from agent import config_file

        return getattr(config_file, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
