"""The daemon over a real broker: frames in, predictions and error events out."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from agent.config import AgentConfig, BrokerConfig, IngestConfig, SleepSchedule
from agent.daemon import Daemon, check_health
from agent.errors import ConfigError
from agent.mqtt import BrokerURL
from agent.protocol import encode_frame_binary, encode_frame_json
from agent.topics import Topics
from firmware_sim.signals import SignalGenerator

WINDOW = 128


def agent_config(bundle, url, device, protocol="5", **kw) -> AgentConfig:
    """A daemon config for tests: sleeping only on command unless `sleep` is given."""
    kw.setdefault("sleep", SleepSchedule(idle_after_s=3600))
    broker = kw.pop("broker", None) or BrokerConfig(url=BrokerURL.parse(url), protocol=protocol,
                                                    client_id=kw.pop("client_id", None))
    return AgentConfig(bundle=bundle, device_id=device, broker=broker, **kw)


def _frames(cls: str, n_windows: int, frame_samples: int = 32, seed: int = 0, seq0: int = 0):
    gen = SignalGenerator(seed)
    n = n_windows * WINDOW // frame_samples
    return [(seq0 + i, 1000.0 + i, gen.samples(cls, frame_samples)) for i in range(n)]


@pytest.fixture
def daemon(sim_bundle, broker_url, broker, unique_device):
    d = Daemon(agent_config(sim_bundle, broker_url, unique_device, broker.protocols[-1]))
    d.start()
    assert d.wait_connected(10)
    yield d
    d.stop()


def _predictions(probe, topic):
    return [m.json() for m in probe.messages if m.topic == topic]


def test_frames_become_predictions(daemon, mqtt_collector, unique_device):
    t = Topics(unique_device)
    probe = mqtt_collector(t.predictions, t.events)
    for i, (seq, ts, values) in enumerate(_frames("run", 3)):
        encode = encode_frame_binary if i % 2 else encode_frame_json
        probe.publish(t.frames, encode(seq, ts, values), qos=0)
    probe.wait_for_count(3, topic=t.predictions, timeout_s=10)
    preds = _predictions(probe, t.predictions)
    assert [p["window"] for p in preds] == [0, 1, 2]
    assert [(p["seq_first"], p["seq_last"]) for p in preds] == [(0, 3), (4, 7), (8, 11)]
    assert all(p["device"] == unique_device for p in preds)
    assert all(abs(sum(p["probs"].values()) - 1) < 1e-3 for p in preds)
    # a model trained on the simulator recognises a steady "run" stream
    assert sum(p["label"] == "run" for p in preds) >= 2, preds
    assert not [m for m in probe.messages if m.topic == t.events]


BAD = [
    (b"{oops", "bad_json"),
    (b'{"seq": 1, "ts": 0, "values": [[1, 2, 3]]}', "bad_channels"),
    (b'{"seq": 1, "ts": 0, "values": [[1, 2, 3, 4, 5, NaN]]}', "non_finite"),
    (encode_frame_binary(1, 0.0, np.ones((4, 6), np.float32))[:-3], "bad_binary"),
    (b"", "empty"),
    (b'{"seq": "x", "ts": 0, "values": [[1]]}', "bad_seq"),
]


def test_malformed_frames_get_error_events_and_daemon_keeps_serving(daemon, mqtt_collector,
                                                                    unique_device):
    t = Topics(unique_device)
    probe = mqtt_collector(t.predictions, t.events)
    for payload, _ in BAD:
        probe.publish(t.frames, payload, qos=1)
    events = probe.wait_for_count(len(BAD), topic=t.events, timeout_s=10)
    got = [e.json() for e in events]
    assert [e["reason"] for e in got] == [r for _, r in BAD]
    assert all(e["type"] == "error" and e["detail"] and e["topic"] == t.frames for e in got)
    assert "expects 6" in got[1]["detail"]
    assert sum(daemon.counters()["dropped"].values()) == len(BAD)
    # still alive: a good stream is predicted
    for seq, ts, values in _frames("idle", 1, seq0=10):
        probe.publish(t.frames, encode_frame_json(seq, ts, values), qos=0)
    probe.wait_for_count(1, topic=t.predictions, timeout_s=10)


def test_gateway_serves_every_device(sim_bundle, broker_url, broker, mqtt_collector,
                                     unique_device):
    prefix = f"gw/{unique_device}"
    d = Daemon(agent_config(sim_bundle, broker_url, "+", broker.protocols[-1], prefix=prefix))
    d.start()
    try:
        assert d.wait_connected(10)
        probe = mqtt_collector(f"{prefix}/+/predictions")
        for dev in ("a1", "b2"):
            for seq, ts, values in _frames("walk", 2):
                probe.publish(f"{prefix}/{dev}/frames", encode_frame_binary(seq, ts, values), qos=0)
        probe.wait_for_count(4, timeout_s=10)
        by_dev = {}
        for m in probe.messages:
            by_dev.setdefault(m.json()["device"], []).append(m.json()["window"])
        assert by_dev == {"a1": [0, 1], "b2": [0, 1]}
    finally:
        d.stop()


def test_bad_config_names_the_key(sim_bundle):
    with pytest.raises(ConfigError, match="threads=0"):
        AgentConfig(bundle=sim_bundle, device_id="d", threads=0)
    with pytest.raises(ConfigError, match="device"):
        AgentConfig(bundle=sim_bundle, device_id="a/b")
    with pytest.raises(ConfigError, match="ingest.queue_size"):
        IngestConfig(queue_size=0)


def test_run_process_sigterm_publishes_offline_and_health(sim_bundle, broker_url, broker,
                                                          mqtt_collector, unique_device, tmp_path):
    """The real `reverie run` process: online status, health, SIGTERM -> offline, exit 0."""
    t = Topics(unique_device)
    probe = mqtt_collector(t.status, t.predictions)
    health = tmp_path / "health.json"
    env = dict(os.environ, REVERIE_HEALTH_FILE=str(health))
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--bundle", str(sim_bundle),
         "--broker", broker_url, "--device-id", unique_device,
         "--protocol", broker.protocols[-1], "--log-format", "json"],
        env=env, stderr=subprocess.PIPE, text=True)
    try:
        probe.wait_for(lambda ms: any(m.topic == t.status and m.json()["state"] == "online"
                                      for m in ms), timeout_s=20)
        for seq, ts, values in _frames("shake", 1):
            probe.publish(t.frames, encode_frame_json(seq, ts, values), qos=0)
        probe.wait_for_count(1, topic=t.predictions, timeout_s=10)
        deadline = time.monotonic() + 15
        while not health.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        ok, detail = check_health(health, max_age_s=30)
        assert ok, detail
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0       # inside Docker's 10 s stop grace period
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert all(json.loads(line)["level"] for line in stderr.splitlines() if line.strip())
    probe.wait_for(lambda ms: any(m.topic == t.status and m.json()["state"] == "offline"
                                  for m in ms), timeout_s=5)
    assert not check_health(health, max_age_s=30)[0]  # stopped daemons are not healthy


def test_run_refuses_a_missing_bundle_with_one_line(tmp_path, capsys):
    from agent.cli import main

    rc = main(["run", "--bundle", str(tmp_path / "nope"), "--device-id", "d"])
    err = capsys.readouterr().err
    assert rc == 2 and "nope: does not exist" in err and "Traceback" not in err


def test_learner_predictions_carry_fusion_and_novelty(daemon, mqtt_collector, unique_device):
    """A split bundle runs the full learner: predictions say which system decided, and a
    window unlike anything in memory raises a novelty event."""
    assert daemon.learner_for(unique_device) is not None
    t = Topics(unique_device)
    probe = mqtt_collector(t.predictions, t.events)
    rng = np.random.default_rng(0)
    frames = _frames("walk", 1) + [(4 + i, 2000.0 + i, (50 * rng.standard_normal((32, 6)) + 30)
                                    .astype(np.float32)) for i in range(4)]
    for seq, ts, values in frames:
        probe.publish(t.frames, encode_frame_binary(seq, ts, values), qos=0)
    probe.wait_for_count(2, topic=t.predictions, timeout_s=10)
    preds = _predictions(probe, t.predictions)
    # the same windows through the learner directly: the daemon reports its answer as is
    learner = daemon.learner_for(unique_device)
    x = np.stack([np.concatenate([v for _, _, v in frames[i:i + 4]]).T for i in (0, 4)])
    direct = learner.predict_many(x.astype(np.float32))
    assert [(p["label"], p["decided_by"]) for p in preds] == \
        [(q.label, q.decided_by) for q in direct]
    assert preds[0]["novelty"] is False and preds[1]["novelty"] is True, preds
    ev = probe.wait_for_count(1, topic=t.events, timeout_s=5)[0].json()
    assert ev["type"] == "novelty" and ev["window"] == 1 and ev["score"] > 0
