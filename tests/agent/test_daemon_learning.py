"""The daemon learning over a real broker: labels, commands, restarts, redelivery."""

import json
import threading
import time

import pytest

from agent.config import IngestConfig, SleepSchedule
from agent.daemon import Daemon
from agent.learner import Learner
from agent.protocol import encode_frame_binary
from agent.topics import Topics
from firmware_sim.signals import SignalGenerator
from tests.agent.test_daemon import agent_config

FRAME = 32          # samples per frame; 4 frames per 128-sample window


def stream(cls: str, n_windows: int, seq0: int = 0, seed: int = 0, ts0: float = 1000.0):
    gen = SignalGenerator(seed)
    n = n_windows * 128 // FRAME
    return [(seq0 + i, ts0 + i * 0.32, gen.samples(cls, FRAME)) for i in range(n)]


def send(probe, topic, frames):
    for seq, ts, values in frames:
        probe.publish(topic, encode_frame_binary(seq, ts, values), qos=0, wait=False)


def events(probe, topic, type_=None):
    out = [m.json() for m in probe.messages if m.topic == topic]
    return [e for e in out if type_ is None or e["type"] == type_]


@pytest.fixture
def make_daemon(base_bundle, start_daemon):
    return lambda device, **kw: start_daemon(base_bundle, device, **kw)


def test_labels_teach_a_new_class_and_predictions_show_it(make_daemon, mqtt_collector,
                                                          unique_device):
    d = make_daemon(unique_device)
    t = Topics(unique_device)
    probe = mqtt_collector(t.predictions, t.events)
    send(probe, t.frames, stream("shake", 12))
    preds = probe.wait_for_count(12, topic=t.predictions, timeout_s=20)
    windows = [p.json()["window"] for p in preds]
    assert windows == list(range(12))
    assert not any(p.json()["label"] == "shake" for p in preds)   # unknown to the base model
    probe.publish(t.labels, json.dumps({"id": "L1", "label": "shake",
                                        "windows": windows}), qos=1)
    probe.wait_for(lambda ms: events(probe, t.events, "label"), timeout_s=10)
    ev = events(probe, t.events, "label")[0]
    assert ev["reason"] == "learned" and ev["id"] == "L1" and ev["windows"] == 12
    assert ev["new_class"] is True and ev["stored"] == 12   # a new class: every window kept
    probe.clear()
    send(probe, t.frames, stream("shake", 6, seq0=48, seed=7, ts0=2000.0))
    preds = [p.json() for p in probe.wait_for_count(6, topic=t.predictions, timeout_s=20)]
    assert sum(p["label"] == "shake" for p in preds) >= 4, [p["label"] for p in preds]
    assert "shake" in preds[0]["probs"]
    # the same label again (a redelivery) changes nothing
    probe.publish(t.labels, json.dumps({"id": "L1", "label": "shake", "windows": windows}), qos=1)
    probe.wait_for(lambda ms: events(probe, t.events, "label"), timeout_s=10)
    assert events(probe, t.events, "label")[0]["reason"] == "duplicate"
    assert d.metrics.labels_duplicate.value() == 1


def test_labels_by_time_range_and_inline_values(make_daemon, mqtt_collector, unique_device):
    make_daemon(unique_device)
    t = Topics(unique_device)
    probe = mqtt_collector(t.predictions, t.events)
    send(probe, t.frames, stream("tilt", 4, ts0=5000.0))
    probe.wait_for_count(4, topic=t.predictions, timeout_s=20)
    probe.publish(t.labels, json.dumps({"id": "T", "label": "tilt", "from_ts": 5000.0,
                                        "to_ts": 5000.0 + 3 * 4 * 0.32}), qos=1)
    window = SignalGenerator(3).window("tilt", 128)            # (128, 6)
    probe.publish(t.labels, json.dumps({"id": "V", "label": "tilt",
                                        "values": window.tolist()}), qos=1)
    probe.wait_for(lambda ms: len(events(probe, t.events, "label")) == 2, timeout_s=10)
    got = {e["id"]: e for e in events(probe, t.events, "label")}
    assert got["T"]["windows"] == 4 and got["V"]["windows"] == 1


def test_a_label_for_a_window_yet_to_come_waits_for_it(make_daemon, mqtt_collector,
                                                       unique_device):
    make_daemon(unique_device, ingest=IngestConfig(label_wait_s=10))
    t = Topics(unique_device)
    probe = mqtt_collector(t.events, t.replies)
    probe.publish(t.labels, json.dumps({"id": "early", "label": "shake", "window": 1}), qos=1)
    # the worker takes labels and commands in order: once this is answered, the label was
    # handled, and it must be waiting (no event yet)
    probe.publish(t.cmd, json.dumps({"id": "after", "cmd": "status"}), qos=1)
    probe.wait_for_count(1, topic=t.replies, timeout_s=10)
    assert not events(probe, t.events)
    send(probe, t.frames, stream("shake", 2))
    probe.wait_for(lambda ms: events(probe, t.events, "label"), timeout_s=10)
    assert events(probe, t.events, "label")[0]["windows"] == 1


BAD_LABELS = [
    (b"{", "bad_json"),
    (b'{"label": "x"}', "bad_target"),
    (b'{"label": "", "window": 1}', "bad_label"),
    (b'{"label": "x", "window": -1}', "bad_window"),
    (b'{"label": "x", "window": 1, "extra": 1}', "unknown_field"),
    (b'{"label": "x", "from_ts": 5, "to_ts": 1}', "bad_range"),
    (b'{"label": "x", "values": [[1, 2]]}', "bad_shape"),
    (b'{"label": "x", "values": [[NaN, 1, 1, 1, 1, 1]]}', "non_finite"),
    (b'{"id": "old", "label": "x", "window": 99999}', "unknown_window"),
]


def test_malformed_labels_and_commands_get_events_and_counters(make_daemon, mqtt_collector,
                                                               unique_device):
    d = make_daemon(unique_device, ingest=IngestConfig(label_wait_s=0.2))
    t = Topics(unique_device)
    probe = mqtt_collector(t.events, t.replies, t.predictions)
    send(probe, t.frames, stream("idle", 1))
    probe.wait_for_count(1, topic=t.predictions, timeout_s=10)
    for payload, _ in BAD_LABELS:
        probe.publish(t.labels, payload, qos=1)
    probe.publish(t.cmd, b'{"cmd": "reboot"}', qos=1)
    probe.wait_for(lambda ms: len(events(probe, t.events, "error")) == len(BAD_LABELS) + 1,
                   timeout_s=10)
    reasons = [e["reason"] for e in events(probe, t.events, "error")]
    # a window id ahead of the stream waits label_wait_s before it is reported unknown
    assert sorted(reasons) == sorted([r for _, r in BAD_LABELS] + ["unknown_command"])
    reply = probe.wait_for_count(1, topic=t.replies, timeout_s=5)[0].json()
    assert reply["ok"] is False and "reboot" in reply["error"]
    dropped = d.counters()["dropped"]
    assert dropped["bad_json"] == 1 and dropped["unknown_window"] == 1
    # still serving, and nothing was learned from the bad labels
    send(probe, t.frames, stream("idle", 1, seq0=4))
    probe.wait_for_count(2, topic=t.predictions, timeout_s=10)
    assert d.metrics.labels_learned.value() == 0


def test_commands_status_snapshot_sleep_and_rollback(make_daemon, mqtt_collector,
                                                     unique_device, tmp_path):
    d = make_daemon(unique_device, state_dir=tmp_path / "state")
    t = Topics(unique_device)
    probe = mqtt_collector(t.events, t.replies, t.predictions)
    send(probe, t.frames, stream("shake", 10))
    probe.wait_for_count(10, topic=t.predictions, timeout_s=20)
    probe.publish(t.labels, json.dumps({"id": "s", "label": "shake",
                                        "windows": list(range(10))}), qos=1)
    probe.wait_for(lambda ms: events(probe, t.events, "label"), timeout_s=10)

    def command(body):
        probe.clear()
        probe.publish(t.cmd, json.dumps(body), qos=1)
        return probe.wait_for_count(1, topic=t.replies, timeout_s=10)[0].json()

    st = command({"id": "c1", "cmd": "status"})
    assert st["ok"] and st["id"] == "c1" and "shake" in st["status"]["classes"]
    snap = command({"id": "c2", "cmd": "snapshot"})
    assert snap["ok"] and snap["checkpoints"] == {unique_device: 1}, snap   # the first
    assert (tmp_path / "state" / "windows.npz").exists()
    sl = command({"id": "c3", "cmd": "sleep", "budget_s": 60})
    assert sl["ok"] and sl["scheduled"]
    probe.wait_for(lambda ms: [e for e in events(probe, t.events, "sleep")
                               if e["reason"] != "started"], timeout_s=30)
    report = [e for e in events(probe, t.events, "sleep") if e["reason"] != "started"][0]
    # a seeded learner on seeded data: the sleep's gate passes (it replays all its samples
    # well inside the budget)
    assert report["reason"] == "accepted", report
    assert report["report"]["adapter_version"] == 1
    version = d.learner_for(unique_device).adapted_head.version
    assert version == 1
    rb = command({"id": "c4", "cmd": "rollback", "to_version": 0})
    assert rb["ok"] and rb["adapter_version"] == 0, rb
    bad = command({"id": "c5", "cmd": "rollback", "to_version": version + 5})
    assert bad["ok"] is False and "to_version" in bad["error"]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_labels_published_while_the_agent_is_down_are_learned_after_restart(
        base_bundle, broker_url, broker, mqtt_collector, unique_device, tmp_path, protocol):
    if protocol not in broker.protocols:
        pytest.skip(f"the test broker does not speak MQTT {protocol}")
    state = tmp_path / "state"
    kw = dict(state_dir=state, client_id=f"agent-{unique_device}")
    t = Topics(unique_device)
    probe = mqtt_collector(t.predictions, t.events)
    d = Daemon(agent_config(base_bundle, broker_url, unique_device, protocol, **kw))
    d.start()
    assert d.wait_connected(10)
    send(probe, t.frames, stream("shake", 8))
    probe.wait_for_count(8, topic=t.predictions, timeout_s=20)
    d.stop()
    # the agent is down: labels wait in its persistent session on the broker
    for i in range(8):
        probe.publish(t.labels, json.dumps({"id": f"down-{i}", "label": "shake", "window": i}),
                      qos=1)
    probe.clear()
    d2 = Daemon(agent_config(base_bundle, broker_url, unique_device, protocol, **kw))
    d2.start()
    try:
        assert d2.wait_connected(10)
        probe.wait_for(lambda ms: len(events(probe, t.events, "label")) == 8, timeout_s=20)
        assert all(e["reason"] == "learned" and e["windows"] == 1
                   for e in events(probe, t.events, "label"))
        learner = d2.learner_for(unique_device)
        assert all(learner.seen(f"{unique_device}/down-{i}/{i}") for i in range(8))
        # window ids continue after the restart: no id is reused
        send(probe, t.frames, stream("idle", 1, seq0=100))
        pred = probe.wait_for_count(1, topic=t.predictions, timeout_s=10)[0].json()
        assert pred["window"] == 8
    finally:
        d2.stop()
    with Learner.from_bundle(base_bundle, state_dir=state) as restored:
        assert "shake" in restored.classes
        assert restored.seen(f"{unique_device}/down-7/7")


def test_gateway_per_device_learners_learn_separately(make_daemon, mqtt_collector,
                                                      unique_device, tmp_path):
    prefix = f"gw/{unique_device}"
    d = make_daemon("+", prefix=prefix, learner_mode="per_device", state_dir=tmp_path / "s")
    probe = mqtt_collector(f"{prefix}/+/predictions", f"{prefix}/+/events")
    a, b = Topics("a", prefix), Topics("b", prefix)
    send(probe, a.frames, stream("shake", 6))
    send(probe, b.frames, stream("shake", 6))
    probe.wait_for_count(12, timeout_s=20)
    probe.publish(a.labels, json.dumps({"id": "x", "label": "shake",
                                        "windows": list(range(6))}), qos=1)
    probe.wait_for(lambda ms: events(probe, a.events, "label"), timeout_s=10)
    assert "shake" in d.learner_for("a").classes
    assert "shake" not in d.learner_for("b").classes
    assert (tmp_path / "s" / "devices" / "a").is_dir()


def test_sleep_runs_off_the_ingest_path(make_daemon, mqtt_collector, unique_device,
                                        monkeypatch):
    """Predictions keep flowing while a sleep runs; an idle sleep is preempted by data.

    The learner's sleep is held until its stop event is set, so the sleep is still running
    when the data returns, whatever the machine's speed: only the daemon acting on the
    scheduler's "stop" decision ends it."""
    d = make_daemon(unique_device, sleep=SleepSchedule(idle_after_s=0.5, min_interval_s=0.1,
                                                      budget_s=20, max_duration_s=60))
    learner = d.learner_for(unique_device)
    real_sleep = learner.sleep

    def sleep_until_stopped(budget_s, stop_event):
        stop_event.wait(60)
        return real_sleep(budget_s=budget_s, stop_event=stop_event)

    monkeypatch.setattr(learner, "sleep", sleep_until_stopped)
    t = Topics(unique_device)
    probe = mqtt_collector(t.predictions, t.events)
    send(probe, t.frames, stream("shake", 10))
    probe.wait_for_count(10, topic=t.predictions, timeout_s=20)
    probe.publish(t.labels, json.dumps({"id": "s", "label": "shake",
                                        "windows": list(range(10))}), qos=1)
    probe.wait_for(lambda ms: [e for e in events(probe, t.events, "sleep")
                               if e["reason"] == "started"], timeout_s=20)
    probe.clear()
    send(probe, t.frames, stream("idle", 2, seq0=40))
    probe.wait_for_count(2, topic=t.predictions, timeout_s=10)    # served while sleeping
    probe.wait_for(lambda ms: events(probe, t.events, "sleep"), timeout_s=20)
    assert [e["reason"] for e in events(probe, t.events, "sleep")] == ["preempted"]
    assert d.metrics.sleeps.value(outcome="preempted") == 1
    assert d.metrics.sleeps.value(outcome="accepted") == 0
    assert d.metrics.sleeps.value(outcome="rolled_back") == 0
    assert d.scheduler.stats()["stops"] == {"frames": 1}
    assert learner.adapted_head.version == 0


def test_a_broker_restart_is_survived(base_bundle, mqtt_collector, unique_device, tmp_path,
                                      broker):
    """Own broker with persistence: restart it under the daemon; the daemon reconnects,
    resubscribes and serves again, and labels sent across the restart are learned."""
    from firmware_sim.broker import EmbeddedBroker

    with EmbeddedBroker(prefer=broker.kind) as own:
        d = Daemon(agent_config(base_bundle, own.url, unique_device, own.protocols[-1],
                                client_id=f"agent-{unique_device}"))
        d.start()
        try:
            assert d.wait_connected(10)
            t = Topics(unique_device)
            probe = mqtt_collector(t.predictions, t.events, url=own.url)
            send(probe, t.frames, stream("walk", 2))
            probe.wait_for_count(2, topic=t.predictions, timeout_s=10)
            probe.close()
            own.restart()
            assert d.wait_connected(30), "the daemon did not reconnect"
            probe = mqtt_collector(t.predictions, t.events, url=own.url)
            send(probe, t.frames, stream("walk", 2, seq0=8))
            probe.wait_for_count(2, topic=t.predictions, timeout_s=10)
            probe.publish(t.labels, json.dumps({"id": "r", "label": "walk", "window": 2}), qos=1)
            probe.wait_for(lambda ms: events(probe, t.events, "label"), timeout_s=10)
            assert d.metrics.reconnects.value() == 1
        finally:
            d.stop()


def test_tls_and_mutual_tls(base_bundle, secure_broker, mqtt_collector, unique_device):
    """The daemon over TLS (server certificate checked against our CA) and mutual TLS."""
    from agent.config import BrokerConfig
    from agent.mqtt import BrokerURL

    pki = secure_broker.pki
    for url, tls in ((secure_broker.url_tls, pki.tls()),
                     (secure_broker.url_mtls, pki.tls(client=True))):
        d = Daemon(agent_config(base_bundle, None, unique_device, broker=BrokerConfig(
            url=BrokerURL.parse(url), tls=tls, session_expiry_s=0)))
        d.start()
        try:
            assert d.wait_connected(10), url
            assert d._client._ssl    # really on TLS
        finally:
            d.stop()
    # mutual TLS without a client certificate: refused, the daemon keeps retrying
    d = Daemon(agent_config(base_bundle, None, unique_device, broker=BrokerConfig(
        url=BrokerURL.parse(secure_broker.url_mtls), tls=pki.tls(), session_expiry_s=0)))
    d.start()
    try:
        assert not d.wait_connected(2)
    finally:
        d.stop()


def test_state_changing_commands_only_on_allowed_topics_and_signed(
        make_daemon, mqtt_collector, unique_device, tmp_path):
    """commands.from = "agent" and commands.key_file: a sleep on a device topic, unsigned,
    badly signed or stale is refused with a reason; a signed one on the agent topic runs;
    status is always answered."""
    from agent.messages import sign_command

    key = b"k" * 32
    (tmp_path / "cmd.key").write_bytes(key)
    prefix = f"gw/{unique_device}"
    make_daemon("+", prefix=prefix, commands_from="agent", commands_key_file=tmp_path / "cmd.key")
    dev, gw = Topics("d1", prefix), Topics("gateway", prefix)
    probe = mqtt_collector(dev.replies, gw.replies, dev.events, gw.events)

    def command(t, body):
        probe.clear()
        probe.publish(t.cmd, json.dumps(body), qos=1)
        return probe.wait_for_count(1, topic=t.replies, timeout_s=10)[0].json()

    assert command(dev, {"id": "s", "cmd": "status"})["ok"]
    r = command(dev, sign_command({"id": "a", "cmd": "snapshot"}, key, topic=dev.cmd,
                                  agent="gateway"))
    assert not r["ok"] and r["reason"] == "not_authorized" and "agent's own topic" in r["error"]
    r = command(gw, {"id": "b", "cmd": "snapshot"})
    assert not r["ok"] and "must be signed" in r["error"]
    r = command(gw, sign_command({"id": "c", "cmd": "snapshot"}, b"x" * 32, topic=gw.cmd,
                                 agent="gateway"))
    assert not r["ok"] and "bad signature" in r["error"]
    r = command(gw, sign_command({"id": "d", "cmd": "snapshot", "ts": time.time() - 3600}, key,
                                 topic=gw.cmd, agent="gateway"))
    assert not r["ok"] and "off the agent's clock" in r["error"]
    r = command(gw, sign_command({"id": "e", "cmd": "snapshot"}, key, topic=gw.cmd,
                                 agent="gateway"))
    assert r["ok"], r


def test_state_files_are_owner_only(make_daemon, mqtt_collector, unique_device, tmp_path):
    """Everything the daemon writes under its state directory: files 0600, directories 0700
    (a device's learned data is the user's data)."""
    import stat

    state = tmp_path / "state"
    prefix = f"gw/{unique_device}"
    d = make_daemon("+", prefix=prefix, learner_mode="per_device", state_dir=state)
    t = Topics("a", prefix)
    probe = mqtt_collector(f"{prefix}/+/predictions", t.events)
    send(probe, t.frames, stream("shake", 3))
    probe.wait_for_count(3, topic=t.predictions, timeout_s=20)
    probe.publish(t.labels, json.dumps({"id": "p", "label": "shake", "windows": [0, 1]}), qos=1)
    probe.wait_for(lambda ms: events(probe, t.events, "label"), timeout_s=10)
    d.stop()
    paths = list(state.rglob("*"))
    assert any(p.name == "windows.npz" for p in paths) and any(p.is_dir() for p in paths)
    loose = [(str(p.relative_to(state)), oct(stat.S_IMODE(p.stat().st_mode)))
             for p in [state, *paths] if stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert not loose, f"group/other can access: {loose}"


def _record_acks(d, log: list) -> None:
    """Append ("ack", "mid N") to `log` for every PUBACK the daemon sends."""
    real = d._client.ack

    def ack(mid, qos):
        log.append(("ack", f"mid {mid}"))
        return real(mid, qos)

    d._client.ack = ack


def _inline_label(id_: str, cls: str = "shake", seed: int = 3) -> str:
    return json.dumps({"id": id_, "label": cls,
                       "values": SignalGenerator(seed).window(cls, 128).tolist()})


def test_a_label_is_acknowledged_only_after_its_log_record_is_fsynced(
        make_daemon, mqtt_collector, unique_device, tmp_path, faulty_disk):
    """PUBACK after fsync: a SIGKILL cannot tell a missing fsync (the page cache survives
    it), so the order of write, fsync and PUBACK is traced at the system calls."""
    d = make_daemon(unique_device, state_dir=tmp_path / "state", checkpoint_interval_s=3600)
    t = Topics(unique_device)
    probe = mqtt_collector(t.events)
    disk = faulty_disk(what=("write", "fsync"), match="/wal/", trace=True)
    _record_acks(d, disk.trace)
    probe.publish(t.labels, _inline_label("f1"), qos=1)
    probe.wait_for(lambda ms: events(probe, t.events, "label"), timeout_s=10)
    wal = tmp_path / "state" / "wal"
    kinds = [(kind, path.startswith(str(wal))) for kind, path in disk.trace]
    assert kinds == [("write", True), ("fsync", True), ("ack", False)], disk.trace
    assert disk.trace[0][1] == disk.trace[1][1]          # the record's own file


def test_a_label_whose_learning_failed_is_retried_not_acknowledged(
        make_daemon, mqtt_collector, unique_device, tmp_path, faulty_disk, monkeypatch):
    """Disk full while learning: `learn_failed` events, no PUBACK, retried until space is
    back, then learned once and acknowledged once."""
    monkeypatch.setattr("agent.worker.LEARN_RETRY_S", 0.1)
    state = tmp_path / "state"
    d = make_daemon(unique_device, state_dir=state, checkpoint_interval_s=3600)
    t = Topics(unique_device)
    probe = mqtt_collector(t.events)
    acks: list = []
    _record_acks(d, acks)
    disk = faulty_disk(match="/wal/")
    disk.full = True
    probe.publish(t.labels, _inline_label("full"), qos=1)
    failed = lambda: [e for e in events(probe, t.events, "error")   # noqa: E731
                      if e["reason"] == "learn_failed"]
    probe.wait_for(lambda ms: len(failed()) >= 2, timeout_s=10)    # failed, then retried
    assert "No space left on device" in failed()[0]["detail"]
    assert acks == []
    assert not events(probe, t.events, "label")
    disk.full = False
    probe.wait_for(lambda ms: events(probe, t.events, "label"), timeout_s=10)
    assert [e["reason"] for e in events(probe, t.events, "label")] == ["learned"]
    assert len(acks) == 1
    assert d.learner_for(unique_device).seen(f"{unique_device}/full")


def test_a_redelivered_command_is_answered_from_the_cache_not_run_again(
        make_daemon, mqtt_collector, unique_device, tmp_path):
    d = make_daemon(unique_device, state_dir=tmp_path / "state", checkpoint_interval_s=3600)
    t = Topics(unique_device)
    probe = mqtt_collector(t.events, t.replies)
    probe.publish(t.labels, _inline_label("c"), qos=1)
    probe.wait_for(lambda ms: events(probe, t.events, "label"), timeout_s=10)
    learner = d.learner_for(unique_device)
    calls = []
    real = learner.checkpoint

    def checkpoint():
        calls.append(1)
        return real()

    learner.checkpoint = checkpoint
    body = json.dumps({"id": "snap-1", "cmd": "snapshot"})
    probe.publish(t.cmd, body, qos=1)
    first = probe.wait_for_count(1, topic=t.replies, timeout_s=10)[0].json()
    probe.publish(t.cmd, body, qos=1)                   # the same command id again
    second = probe.wait_for_count(2, topic=t.replies, timeout_s=10)[1].json()
    assert first["ok"] is True and "duplicate" not in first
    assert second["duplicate"] is True
    assert second["checkpoints"] == first["checkpoints"]
    assert len(calls) == 1


def test_the_frame_queue_is_bounded_and_counts_what_it_drops(
        base_bundle, broker_url, broker, mqtt_collector, unique_device):
    """A worker that does not keep up: the queue holds `ingest.queue_size` frames, the
    rest are dropped and counted `queue_full` (never a growing queue)."""
    d = Daemon(agent_config(base_bundle, broker_url, unique_device, broker.protocols[-1],
                            ingest=IngestConfig(queue_size=4)))
    d._worker = threading.Thread(target=lambda: None)      # nobody takes frames
    d.start()
    try:
        assert d.wait_connected(10)
        t = Topics(unique_device)
        probe = mqtt_collector()
        send(probe, t.frames, stream("idle", 3))             # 12 frames
        received = d.metrics.messages_received
        assert _wait_until(lambda: received.value(kind="frames") == 12)
        assert d._frames.qsize() == 4
        assert d.metrics.dropped.value(reason="queue_full") == 8
    finally:
        while not d._frames.empty():
            d._frames.get_nowait()
        d.stop()


def _wait_until(predicate, timeout_s: float = 10.0) -> bool:
    """Poll `predicate` (a counter another thread bumps) until it holds, or time out."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
