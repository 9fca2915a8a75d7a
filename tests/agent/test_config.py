"""agent/config.py: the TOML + environment + flags configuration, and `reverie config`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cli import build_parser, main
from agent.config import (
    KEYS,
    AgentConfig,
    BrokerConfig,
    IngestConfig,
    SleepSchedule,
    effective_value,
    load_config,
    parse_window,
    render_config,
)
from agent.daemon_cli import example_text, overrides_from_args
from agent.errors import ConfigError
from agent.mqtt import BrokerURL, TLSConfig
from agent.protocol import MAX_PAYLOAD_BYTES

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "agent.example.toml"
REVERIE = Path(sys.executable).with_name("reverie")
MINIMAL = {"REVERIE_BUNDLE": "/b", "REVERIE_DEVICE_ID": "dev1"}


def _write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _load_text(tmp_path: Path, text: str, env: dict | None = None, **kw) -> AgentConfig:
    head = '[agent]\nbundle = "/b"\ndevice_id = "d"\n'
    return load_config(_write(tmp_path, head + text), env=env, **kw)


@pytest.fixture
def clean_env(monkeypatch):
    """The CLI reads os.environ: no REVERIE_* variable of the test runner leaks in."""
    for var in list(os.environ):
        if var.startswith("REVERIE_"):
            monkeypatch.delenv(var)


# ---------------------------------------------------------------------- defaults

def test_defaults():
    cfg = AgentConfig(bundle="b", device_id="dev1")
    assert cfg.bundle == Path("b") and cfg.prefix == "reverie/v1" and cfg.threads == 1
    assert cfg.broker == BrokerConfig() and cfg.broker.url == BrokerURL("127.0.0.1", 1883)
    assert cfg.broker.tls == TLSConfig() and cfg.broker.session_expiry_s == 7 * 86400
    assert cfg.ingest.max_payload_bytes == MAX_PAYLOAD_BYTES and cfg.ingest.hop is None
    assert cfg.sleep.enabled and cfg.sleep.windows == () and cfg.metrics_address is None
    assert (cfg.status_owner, cfg.client_id) == ("dev1", "reverie-dev1")
    gw = AgentConfig(bundle="b", device_id="+")
    assert (gw.status_owner, gw.client_id) == ("gateway", "reverie-gateway")
    named = replace(gw, agent_id="gw7", broker=BrokerConfig(client_id="cid"))
    assert (named.status_owner, named.client_id) == ("gw7", "cid")


def test_env_only_gives_the_defaults():
    assert load_config(env=MINIMAL) == AgentConfig(bundle=Path("/b"), device_id="dev1")


def test_dataclasses_coerce_paths_and_numbers():
    cfg = AgentConfig(bundle="b", device_id="d", public_keys="k.pub", state_dir="s",
                      health_file="h", checkpoint_interval_s=10, log_level="DEBUG")
    assert cfg.public_keys == (Path("k.pub"),) and cfg.state_dir == Path("s")
    assert cfg.health_file == Path("h") and cfg.log_level == "debug"
    assert isinstance(cfg.checkpoint_interval_s, float)
    assert SleepSchedule(windows=["01:00-02:00"]).windows == ("01:00-02:00",)
    assert BrokerConfig(url="mqtt://u:p@h:1").url == BrokerURL("h", 1, False, "u", "p")


@pytest.mark.parametrize("make, message", [
    (lambda: IngestConfig(queue_size=0), "ingest.queue_size=0, expected >= 1"),
    (lambda: IngestConfig(hop=0), "ingest.hop=0, expected >= 1"),
    (lambda: IngestConfig(max_batch=2.5), "ingest.max_batch=2.5, expected an integer"),
    (lambda: IngestConfig(label_wait_s=float("nan")), "ingest.label_wait_s=nan"),
    (lambda: BrokerConfig(reconnect_min_s=5, reconnect_max_s=1),
     "broker.reconnect_min_s=5.0, expected <= broker.reconnect_max_s"),
    (lambda: BrokerConfig(protocol="4"), "broker.protocol='4', expected '5' or '3.1.1'"),
    (lambda: BrokerConfig(url="http://h"), "broker.url: Invalid broker URL"),
    (lambda: BrokerConfig(url=BrokerURL("h", 1, password="p")), "broker.password is set"),
    (lambda: BrokerConfig(tls=TLSConfig(ca_file="ca.pem")), "use mqtts://"),
    (lambda: SleepSchedule(windows=("25:00-01:00",)), "sleep.windows: sleep window '25:00-01:00'"),
    (lambda: SleepSchedule(budget_s=400), "sleep.budget_s=400.0, expected <= sleep.max_duration_s"),
    (lambda: SleepSchedule(idle_after_s=0), "sleep.idle_after_s=0, expected a number > 0"),
    (lambda: AgentConfig(bundle="b", device_id="a/b"), "agent.device_id='a/b': Invalid device id"),
    (lambda: AgentConfig(bundle="b", device_id="d", prefix="x/#"), "agent.prefix='x/#'"),
    (lambda: AgentConfig(bundle="b", device_id="d", agent_id="+"), "agent.agent_id='+'"),
    (lambda: AgentConfig(bundle="b", device_id="d", learner_mode="each"), "agent.learner='each'"),
    (lambda: AgentConfig(bundle="b", device_id="d", metrics_listen="host"), "metrics.listen='host'"),
    (lambda: AgentConfig(bundle="b", device_id="d", metrics_listen=":80"), "metrics.listen=':80'"),
    (lambda: AgentConfig(bundle="b", device_id="d", metrics_listen="h:70000"), "metrics.listen"),
    (lambda: AgentConfig(bundle="b", device_id="d", log_format="xml"), "logging.format='xml'"),
    (lambda: AgentConfig(bundle="b", device_id="d", log_level="loud"), "logging.level='loud'"),
    (lambda: AgentConfig(bundle="b", device_id="d", health_interval_s=-1), "health.interval_s=-1"),
    (lambda: AgentConfig(bundle="b", device_id="d", checkpoint_interval_s=0),
     "checkpoint.interval_s=0"),
])
def test_each_dataclass_error_names_its_key(make, message):
    with pytest.raises(ConfigError) as info:
        make()
    assert message in str(info.value)


def test_parse_window():
    assert parse_window("02:00-04:00") == (120, 240)
    assert parse_window(" 2:05 - 23:59 ") == (125, 1439)
    assert parse_window("23:30-00:15") == (1410, 15)
    assert parse_window("20:00-24:00") == (1200, 1440)
    for bad in ("2-4", "02:00", "02:60-03:00", "24:00-01:00", "01:00-24:30", "01:00-01:00",
                "00:00-24:00", "ab:cd-01:00", 120):
        with pytest.raises(ConfigError, match=re.escape(repr(bad))):
            parse_window(bad)


# ---------------------------------------------------------------------- the file

FULL = """
[agent]
bundle = "bundle"
device_id = "+"
prefix = "site/v2"
agent_id = "gw1"
state_dir = "state"
public_keys = "keys/a.pub, /etc/b.pub"
threads = 3
learner = "per_device"

[broker]
url = "mqtts://broker.local"
protocol = "3.1.1"
client_id = "gw1-client"
keepalive_s = 10
session_expiry_s = 0
username = "gw"
password = "s3cret"
ca_file = "tls/ca.pem"
tls_insecure = true
reconnect_min_s = 1
reconnect_max_s = 8.5
outbox_max = 50

[ingest]
hop = 32
queue_size = 100
max_batch = 8
max_payload_bytes = 1024
reorder_frames = 0
max_devices = 5
history_windows = 16
label_wait_s = 0

[sleep]
enabled = false
idle_after_s = 30
idle_rate_hz = 0.25
windows = ["02:00-04:00", "23:30-00:30"]
max_duration_s = 120
budget_s = 100
min_interval_s = 0
min_new_episodes = 0

[checkpoint]
interval_s = 60

[metrics]
listen = "0.0.0.0:9100"

[health]
file = "/run/health.json"
interval_s = 2.5

[logging]
level = "WARNING"
format = "json"
"""


def test_file_parsing_sets_every_key_and_resolves_relative_paths(tmp_path):
    cfg = load_config(_write(tmp_path, FULL))
    assert cfg.bundle == tmp_path / "bundle" and cfg.state_dir == tmp_path / "state"
    assert cfg.public_keys == (tmp_path / "keys/a.pub", Path("/etc/b.pub"))
    assert (cfg.device_id, cfg.prefix, cfg.agent_id, cfg.threads, cfg.learner_mode) == \
        ("+", "site/v2", "gw1", 3, "per_device")
    assert cfg.broker == BrokerConfig(
        url=BrokerURL("broker.local", 8883, True, "gw", "s3cret"), protocol="3.1.1",
        client_id="gw1-client", keepalive_s=10, session_expiry_s=0,
        tls=TLSConfig(ca_file=tmp_path / "tls/ca.pem", insecure=True), reconnect_min_s=1.0,
        reconnect_max_s=8.5, outbox_max=50)
    assert cfg.ingest == IngestConfig(32, 100, 8, 1024, 0, 5, 16, 0.0)
    assert cfg.sleep == SleepSchedule(False, 30.0, 0.25, ("02:00-04:00", "23:30-00:30"),
                                      120.0, 100.0, 0.0, 0)
    assert (cfg.checkpoint_interval_s, cfg.metrics_address, cfg.health_file) == \
        (60.0, ("0.0.0.0", 9100), Path("/run/health.json"))
    assert (cfg.health_interval_s, cfg.log_level, cfg.log_format) == (2.5, "warning", "json")
    assert cfg.client_id == "gw1-client" and cfg.status_owner == "gw1"


def test_the_file_path_can_come_from_reverie_config(tmp_path):
    path = _write(tmp_path, '[agent]\nbundle = "b"\ndevice_id = "x"\n')
    cfg = load_config(env={"REVERIE_CONFIG": str(path)})
    assert cfg.bundle == tmp_path / "b" and cfg.device_id == "x"


def test_a_relative_file_path_still_gives_absolute_paths(tmp_path, monkeypatch):
    _write(tmp_path, '[agent]\nbundle = "b"\ndevice_id = "x"\nstate_dir = "~/st"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config("agent.toml")
    assert cfg.bundle == tmp_path / "b" and cfg.state_dir == Path("~/st").expanduser()


@pytest.mark.parametrize("text, message", [
    ("[ingest]\nqueue_sise = 3\n", "unknown key ingest.queue_sise in {path} "
                                   "(did you mean ingest.queue_size?)"),
    ("[agent]\nhop = 3\n", "unknown key agent.hop in {path} (did you mean ingest.hop?)"),
    ("[ingst]\nhop = 3\n", "unknown section [ingst] in {path} (did you mean ingest?)"),
    ("hop = 3\n", "key 'hop' outside any [section] in {path} (did you mean ingest.hop?)"),
    ("[agent]\nthreads = \"2\"\n", "agent.threads='2', expected an integer (in {path})"),
    ("[agent]\nthreads = 2.0\n", "agent.threads=2.0, expected an integer"),
    ("[sleep]\nenabled = 1\n", "sleep.enabled=1, expected true or false"),
    ("[sleep]\nwindows = \"02:00-03:00\"\n", "sleep.windows='02:00-03:00', expected a list"),
    ("[broker]\nprotocol = 5\n", "broker.protocol=5, expected a string"),
    ("[ingest]\nqueue_size = 0\n", "ingest.queue_size=0, expected >= 1 (in {path})"),
    ("[sleep]\nwindows = [\"02:00-26:00\"]\n", "sleep.windows: sleep window '02:00-26:00'"),
    ("[broker]\nurl = \"localhost:1883\"\n", "broker.url: Invalid broker URL: 'localhost:1883'"),
    ("[broker]\nurl = \"mqtt://h:99999\"\n", "broker.url: Invalid broker URL"),
    ("[broker]\nreconnect_min_s = 60.0\n", "broker.reconnect_min_s=60.0, expected <= "),
    ("[broker]\ncert_file = \"c.pem\"\n", "broker.cert_file and broker.key_file"),
    ("[broker]\npassword = \"p\"\npassword_file = \"p.txt\"\n", "broker.password and "
                                                               "broker.password_file are both set"),
    ("[metrics]\nlisten = \"0.0.0.0:http\"\n", "metrics.listen='0.0.0.0:http'"),
    ("[agent\n", "invalid TOML"),
])
def test_each_file_error_names_its_key(tmp_path, text, message):
    required = '[agent]\nbundle = "/b"\ndevice_id = "d"\n'
    if text.startswith("[agent]"):
        text = required + text.removeprefix("[agent]\n")
    elif not text.startswith("[agent"):  # "[agent\n" is the broken-TOML case
        text = required + text if text.startswith("[") else text + required
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message.format(path=path) in str(info.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml.*no such file"):
        load_config(tmp_path / "nope.toml", env=MINIMAL)


def test_missing_bundle_or_device_says_how_to_set_them(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(env={"REVERIE_DEVICE_ID": "d"})
    assert all(s in str(info.value) for s in ("--bundle", "REVERIE_BUNDLE", "[agent]"))
    with pytest.raises(ConfigError) as info:
        load_config(env={"REVERIE_BUNDLE": "b"})
    assert all(s in str(info.value) for s in ("--device-id", "REVERIE_DEVICE_ID", "[agent]"))


# ---------------------------------------------------------------------- environment and flags

def test_env_overrides_the_file_and_flags_override_env(tmp_path):
    text = '[ingest]\nqueue_size = 10\nhop = 4\n[broker]\nurl = "mqtt://file:1"\n'
    env = {"REVERIE_INGEST_QUEUE_SIZE": "100", "REVERIE_BROKER": "mqtt://env:2",
           "REVERIE_SLEEP_WINDOWS": "02:00-04:00, 13:00-13:30", "REVERIE_SLEEP_ENABLED": "off"}
    cfg = _load_text(tmp_path, text, env)
    assert (cfg.ingest.queue_size, cfg.ingest.hop, cfg.broker.url.host) == (100, 4, "env")
    assert cfg.sleep.windows == ("02:00-04:00", "13:00-13:30") and not cfg.sleep.enabled
    cfg = _load_text(tmp_path, text, env, overrides={
        "ingest.queue_size": 7, "broker.url": "mqtt://flag:3", "ingest.hop": None})
    assert (cfg.ingest.queue_size, cfg.ingest.hop, cfg.broker.url.host) == (7, 4, "flag")


def test_legacy_aliases_and_the_canonical_names():
    env = dict(MINIMAL, REVERIE_PREFIX="p/q", REVERIE_HOP="16", REVERIE_THREADS="2",
               REVERIE_PROTOCOL="3.1.1", REVERIE_HEALTH_FILE="h.json",
               REVERIE_PUBLIC_KEY="a.pub,b.pub", REVERIE_STATE_DIR="st",
               REVERIE_LOG_LEVEL="debug", REVERIE_LOG_FORMAT="json",
               REVERIE_BROKER="mqtt://u@x:1", REVERIE_METRICS_LISTEN="127.0.0.1:0",
               REVERIE_AGENT_LEARNER="per_device", REVERIE_BROKER_TLS_INSECURE="true",
               REVERIE_TEST_BROKER="mosquitto", REVERIE_DEMO_CACHE="x", OTHER="y")
    cfg = load_config(env=env)
    assert (cfg.bundle, cfg.device_id, cfg.prefix, cfg.ingest.hop, cfg.threads) == \
        (Path("/b"), "dev1", "p/q", 16, 2)
    assert (cfg.broker.protocol, cfg.health_file, cfg.state_dir) == \
        ("3.1.1", Path("h.json"), Path("st"))
    assert cfg.public_keys == (Path("a.pub"), Path("b.pub"))
    assert (cfg.log_level, cfg.log_format, cfg.metrics_address) == ("debug", "json",
                                                                    ("127.0.0.1", 0))
    assert cfg.broker.url == BrokerURL("x", 1, username="u") and cfg.learner_mode == "per_device"
    assert cfg.broker.tls.insecure
    canonical = {"REVERIE_AGENT_BUNDLE": "/b", "REVERIE_AGENT_DEVICE_ID": "d",
                 "REVERIE_BROKER_URL": "mqtt://y", "REVERIE_INGEST_HOP": "3"}
    cfg = load_config(env=canonical)
    assert (cfg.broker.url.host, cfg.ingest.hop) == ("y", 3)


def test_an_empty_env_var_unsets_an_optional_key(tmp_path):
    cfg = _load_text(tmp_path, '[health]\nfile = "h.json"\n[ingest]\nhop = 4\n',
                     {"REVERIE_HEALTH_FILE": "", "REVERIE_HOP": " "})
    assert cfg.health_file is None and cfg.ingest.hop is None


@pytest.mark.parametrize("env, message", [
    ({"REVERIE_INGEST_QUEUE_SIZE": "many"},
     "REVERIE_INGEST_QUEUE_SIZE='many', expected an integer (ingest.queue_size)"),
    ({"REVERIE_SLEEP_ENABLED": "maybe"}, "REVERIE_SLEEP_ENABLED='maybe', expected true or false"),
    ({"REVERIE_BROKER_RECONNECT_MAX_S": "1e"}, "REVERIE_BROKER_RECONNECT_MAX_S='1e'"),
    ({"REVERIE_INGEST_QUEUE_SIZE": "0"},
     "ingest.queue_size=0, expected >= 1 (from REVERIE_INGEST_QUEUE_SIZE)"),
    ({"REVERIE_SLEEP_WINDOWS": "2am-4am"}, "sleep window '2am-4am'"),
    ({"REVERIE_BROKER": "broker:1883"}, "Invalid broker URL: 'broker:1883'"),
    ({"REVERIE_INGEST_QUEUE_SISE": "3"},
     "unknown environment variable REVERIE_INGEST_QUEUE_SISE (did you mean "
     "REVERIE_INGEST_QUEUE_SIZE?)"),
    ({"REVERIE_SLEEP_WINDOW": "02:00-03:00"}, "did you mean REVERIE_SLEEP_WINDOWS?"),
    ({"REVERIE_BROKER": "mqtt://a", "REVERIE_BROKER_URL": "mqtt://b"},
     "REVERIE_BROKER='mqtt://a' and REVERIE_BROKER_URL='mqtt://b' both set broker.url"),
])
def test_each_env_error_names_the_variable(env, message):
    with pytest.raises(ConfigError) as info:
        load_config(env=dict(MINIMAL, **env))
    assert message in str(info.value)


def test_the_same_value_under_alias_and_canonical_name_is_fine():
    cfg = load_config(env=dict(MINIMAL, REVERIE_HOP="4", REVERIE_INGEST_HOP="4"))
    assert cfg.ingest.hop == 4


def test_flags_are_type_checked_and_named():
    with pytest.raises(ConfigError, match="agent.threads='2', expected an integer"):
        load_config(env=MINIMAL, overrides={"agent.threads": "2"})
    with pytest.raises(ConfigError, match=r"unknown setting 'agent.thread' \(did you mean "
                                          r"agent.threads\?\)"):
        load_config(env=MINIMAL, overrides={"agent.thread": 2})
    with pytest.raises(ConfigError, match=r"agent.threads=0, expected >= 1 \(from the command"):
        load_config(env=MINIMAL, overrides={"agent.threads": 0})


def test_run_flags_become_overrides():
    args = build_parser().parse_args([
        "run", "--bundle", "bdir", "--device-id", "+", "--hop", "8", "--public-key", "a.pub,b.pub",
        "--public-key", "c.pub", "--metrics", "[::1]:9100", "--learner", "per_device",
        "--log-level", "debug", "--broker", "mqtt://h:1"])
    overrides = overrides_from_args(args)
    assert overrides == {"agent.bundle": "bdir", "agent.device_id": "+", "ingest.hop": 8,
                         "agent.public_keys": ["a.pub,b.pub", "c.pub"],
                         "metrics.listen": "[::1]:9100", "agent.learner": "per_device",
                         "logging.level": "debug", "broker.url": "mqtt://h:1"}
    cfg = load_config(env={"REVERIE_THREADS": "4"}, overrides=overrides)
    assert cfg.public_keys == (Path("a.pub"), Path("b.pub"), Path("c.pub")) and cfg.threads == 4


# ---------------------------------------------------------------------- credentials

def test_password_file_is_read_and_stripped(tmp_path):
    (tmp_path / "pw").write_text("hunter2\n")
    cfg = _load_text(tmp_path, '[broker]\nurl = "mqtt://gw@h"\npassword_file = "pw"\n')
    assert cfg.broker.url == BrokerURL("h", 1883, False, "gw", "hunter2")
    assert "hunter2" not in render_config(cfg) and 'password = "***"' in render_config(cfg)


def test_password_file_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"broker.password_file='.*missing': cannot read"):
        _load_text(tmp_path, '[broker]\nusername = "u"\npassword_file = "missing"\n')
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"broker.password_file='.*empty' is empty"):
        _load_text(tmp_path, '[broker]\nusername = "u"\npassword_file = "empty"\n')


def test_credentials_follow_the_layers(tmp_path):
    (tmp_path / "pw").write_text("from-file")
    text = '[broker]\nurl = "mqtt://a:urlpw@h"\nusername = "b"\npassword_file = "pw"\n'
    cfg = _load_text(tmp_path, text)  # keys beat the URL of the same layer
    assert (cfg.broker.url.username, cfg.broker.url.password) == ("b", "from-file")
    cfg = _load_text(tmp_path, text, {"REVERIE_BROKER_PASSWORD": "from-env"})
    assert (cfg.broker.url.username, cfg.broker.url.password) == ("b", "from-env")
    cfg = _load_text(tmp_path, text, {"REVERIE_BROKER": "mqtt://c:envpw@h2"})
    assert cfg.broker.url == BrokerURL("h2", 1883, False, "c", "envpw")  # a newer URL wins
    with pytest.raises(ConfigError, match="broker.password is set but no user name"):
        _load_text(tmp_path, '[broker]\npassword = "p"\n')


# ---------------------------------------------------------------------- rendering and the CLI

def test_render_round_trips_and_masks(tmp_path):
    cfg = load_config(_write(tmp_path, FULL))
    masked = render_config(cfg)
    assert "s3cret" not in masked and 'password = "***"' in masked
    again = load_config(_write(tmp_path, render_config(cfg, mask_secrets=False), "out.toml"))
    assert again == cfg
    odd = replace(cfg, prefix='a"b\\c\x7f\té/z', broker=replace(
        cfg.broker, url=BrokerURL("::1", 1884, True, "u", "p")))
    again = load_config(_write(tmp_path, render_config(odd, mask_secrets=False), "odd.toml"))
    assert again == odd


def test_every_key_is_rendered_and_documented_in_the_example():
    cfg = load_config(env=MINIMAL)
    text = render_config(cfg)
    example = EXAMPLE.read_text()
    for key in KEYS:
        section, name = key.split(".")
        effective_value(cfg, key)
        assert f"[{section}]" in text and f"[{section}]" in example
        assert f"\n{name} = " in example or f"\n# {name} = " in example, key
        if key != "broker.password_file":
            assert f"\n{name} = " in text or f"\n# {name} = " in text, key


def test_the_docs_example_is_the_packaged_one():
    assert EXAMPLE.read_text() == example_text()
    assert EXAMPLE.read_text() == (ROOT / "agent" / "data" / "agent.example.toml").read_text()


def _cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("REVERIE_")}


def test_the_example_holds_placeholders_that_check_and_run_refuse_in_one_line(tmp_path):
    out = subprocess.run([str(REVERIE), "config", "check", str(EXAMPLE)], capture_output=True,
                         text=True, env=_cli_env(), cwd=ROOT)
    assert out.returncode == 2 and out.stdout == "" and len(out.stderr.splitlines()) == 1
    for key in ("agent.bundle='<BUNDLE_DIR>'", "agent.state_dir='<STATE_DIR>'",
                "broker.url='<mqtt://HOST:PORT>'"):
        assert key in out.stderr
    run = subprocess.run([str(REVERIE), "run", "--config", str(EXAMPLE)], capture_output=True,
                         text=True, env=_cli_env(), cwd=ROOT)
    assert run.returncode == 2 and run.stderr == out.stderr.replace("reverie config:", "reverie run:")
    # no credentials that look real
    assert "change-me" not in EXAMPLE.read_text() and '\npassword = ' not in EXAMPLE.read_text()


def test_a_placeholder_is_filled_by_a_flag_or_the_environment(tmp_path):
    with pytest.raises(ConfigError, match=r"placeholder.*agent\.bundle='<BUNDLE_DIR>'"):
        load_config(EXAMPLE, env={"REVERIE_BROKER_URL": "mqtt://h:1", "REVERIE_STATE_DIR": "s"})
    cfg = load_config(EXAMPLE, env={"REVERIE_BROKER_URL": "mqtt://h:1"},
                      overrides={"agent.bundle": "b", "agent.state_dir": "s"})
    assert (cfg.bundle, cfg.broker.url.host) == (Path("b"), "h")
    # only where a placeholder can stand: "<x>" is a fine password or prefix
    cfg = _load_text(tmp_path, '[broker]\nusername = "u"\npassword = "<x>"\n')
    assert cfg.broker.url.password == "<x>"


def test_config_example_fills_in_its_flags_and_check_judges_the_paths(
        sim_bundle, tmp_path, clean_env, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "example", "--bundle", str(sim_bundle), "--broker",
                 "mqtt://127.0.0.1:1884", "--state-dir", "st"]) == 0
    text = capsys.readouterr().out
    assert f'bundle = "{sim_bundle}"' in text and 'url = "mqtt://127.0.0.1:1884"' in text
    assert f'state_dir = "{tmp_path / "st"}"' in text and not re.search(r'^\w+ = "<', text, re.M)
    cfg = _write(tmp_path, text)
    monkeypatch.setenv("REVERIE_BROKER_USERNAME", "u")
    monkeypatch.setenv("REVERIE_BROKER_PASSWORD", "secret")
    assert main(["config", "check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert 'password = "***"' in out and "secret" not in out
    assert 'device_id = "+"' in out and "client id used: reverie-gateway" in out
    assert f"ok: agent.bundle = {sim_bundle} (bundle " in out and "hashes verified" in out
    assert "ok: agent.state_dir" in out and "(will be created)" in out
    assert "not checked: broker.url mqtt://u@127.0.0.1:1884: whether the broker is reachable" in out
    # a missing public key, an unwritable state dir: one line each, exit 2
    monkeypatch.setenv("REVERIE_PUBLIC_KEY", str(tmp_path / "release.pub"))
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    monkeypatch.setenv("REVERIE_STATE_DIR", str(ro / "state"))
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert f"reverie config check: error: agent.public_keys='{tmp_path}/release.pub': does " \
           "not exist" in err
    assert any(line.startswith("reverie config check: error: agent.bundle=") and
               "not checked" in line for line in err)
    if os.geteuid() != 0:   # root writes anywhere
        assert any("agent.state_dir=" in line and "not writable" in line for line in err)


def test_reverie_config_check_a_broken_file_exits_2_naming_the_key(tmp_path):
    bad = _write(tmp_path, EXAMPLE.read_text().replace("max_batch = 64", "max_bach = 64"))
    out = subprocess.run([str(REVERIE), "config", "check", str(bad)], capture_output=True,
                         text=True, env=_cli_env())
    assert out.returncode == 2 and out.stdout == ""
    assert "unknown key ingest.max_bach" in out.stderr and "ingest.max_batch?" in out.stderr
    assert "Traceback" not in out.stderr


def test_config_check_reads_the_environment_in_process(sim_bundle, tmp_path, clean_env,
                                                       monkeypatch, capsys):
    for var, value in (("REVERIE_BUNDLE", str(sim_bundle)), ("REVERIE_BROKER", "mqtt://h:1"),
                       ("REVERIE_STATE_DIR", str(tmp_path / "state"))):
        monkeypatch.setenv(var, value)     # fill the example's placeholders
    monkeypatch.setenv("REVERIE_INGEST_QUEUE_SIZE", "0")
    assert main(["config", "check", str(EXAMPLE)]) == 2
    err = capsys.readouterr().err
    assert "reverie config: error: ingest.queue_size=0, expected >= 1 (from " \
           "REVERIE_INGEST_QUEUE_SIZE)" in err
    monkeypatch.setenv("REVERIE_INGEST_QUEUE_SIZE", "12")
    assert main(["config", "check", str(EXAMPLE)]) == 0
    assert "queue_size = 12" in capsys.readouterr().out
    assert main(["config", "example"]) == 0
    assert capsys.readouterr().out == EXAMPLE.read_text()


def test_run_with_a_bad_config_exits_2_before_starting(tmp_path, clean_env, capsys):
    bad = _write(tmp_path, '[agent]\nbundle = "b"\ndevice_id = "d"\nthreads = 0\n')
    assert main(["run", "--config", str(bad)]) == 2
    assert f"agent.threads=0, expected >= 1 (in {bad})" in capsys.readouterr().err
    assert main(["run", "--device-id", "d"]) == 2
    assert "no bundle: pass --bundle DIR" in capsys.readouterr().err


# ---------------------------------------------------------------------- property

_windows = st.builds(lambda a, b, c, d: f"{a:02d}:{b:02d}-{c:02d}:{d:02d}",
                     st.integers(0, 23), st.integers(0, 59), st.integers(0, 23),
                     st.integers(0, 59)).filter(lambda w: w[:5] != w[6:])
_prefix = st.text(st.characters(blacklist_characters="#+\x00"), min_size=1,
                  max_size=20).filter(lambda p: not p.endswith("/"))
_device = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True).filter(
    lambda d: d not in (".", "..")) | st.just("+")      # "." and ".." are refused (paths)
_seconds = st.floats(0.001, 1e9, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(device=_device, prefix=_prefix, queue=st.integers(1, 2**40), hop=st.none() | st.integers(1, 10**6),
       label_wait=st.floats(0, 1e6) | st.integers(0, 10**6), windows=st.lists(_windows, max_size=4),
       enabled=st.booleans(), budget=_seconds, extra=_seconds, password=st.text(min_size=1),
       keys=st.lists(st.from_regex(r"[a-z]{1,8}\.pub", fullmatch=True), max_size=3))
def test_toml_round_trips(device, prefix, queue, hop, label_wait, windows, enabled, budget,
                          extra, password, keys):
    def s(v: str) -> str:
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")

    lines = ["[agent]", 'bundle = "/b"', f"device_id = {s(device)}", f"prefix = {s(prefix)}",
             f"public_keys = [{', '.join(s(k) for k in keys)}]",
             "[broker]", 'username = "u"', f"password = {s(password)}",
             "[ingest]", f"queue_size = {queue}", f"label_wait_s = {label_wait!r}",
             *([f"hop = {hop}"] if hop is not None else []),
             "[sleep]", f"enabled = {'true' if enabled else 'false'}",
             f"windows = [{', '.join(s(w) for w in windows)}]",
             f"budget_s = {budget!r}", f"max_duration_s = {budget + extra!r}"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.toml"
        path.write_text("\n".join(lines) + "\n")
        cfg = load_config(path)
        assert (cfg.device_id, cfg.prefix) == (device, prefix)
        assert cfg.public_keys == tuple(Path(tmp) / k for k in keys)
        assert cfg.broker.url == BrokerURL("127.0.0.1", 1883, False, "u", password)
        assert cfg.ingest == IngestConfig(hop=hop, queue_size=queue, label_wait_s=label_wait)
        assert cfg.sleep == SleepSchedule(enabled=enabled, windows=tuple(windows),
                                          budget_s=budget, max_duration_s=budget + extra)
        path.write_text(render_config(cfg, mask_secrets=False))
        assert load_config(path) == cfg


def test_a_path_with_an_unknown_users_home_names_the_variable(tmp_path):
    """``~nosuchuser/x`` cannot be expanded: a ConfigError naming where it came from (found
    by the fuzz tests: it used to escape as RuntimeError)."""
    with pytest.raises(ConfigError, match="REVERIE_AGENT_BUNDLE.*cannot expand"):
        load_config(env={"REVERIE_AGENT_BUNDLE": "~no-such-user-0/b", "REVERIE_DEVICE_ID": "d"})
    cfg = tmp_path / "c.toml"
    cfg.write_text('[agent]\nbundle = "~no-such-user-0/b"\ndevice_id = "d"\n')
    with pytest.raises(ConfigError, match="agent.bundle.*cannot expand"):
        load_config(cfg)
