"""`reverie run` processes killed with SIGKILL while learning and while sleeping: every
label the broker accepted is learned exactly once after a restart (acknowledged ones from
the write-ahead log, unacknowledged ones redelivered from the persistent session)."""

import json
import os
import signal
import subprocess
import sys

import pytest

from agent.learner import Learner
from agent.topics import Topics
from firmware_sim.signals import SignalGenerator

N_LABELS = 150


def _start(bundle, url, device, state, protocol):
    env = dict(os.environ, REVERIE_BROKER_CLIENT_ID=f"agent-{device}",
               REVERIE_SLEEP_IDLE_AFTER_S="3600")
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--bundle", str(bundle), "--broker", url,
         "--device-id", device, "--protocol", protocol, "--state-dir", str(state),
         "--log-format", "json"], env=env, stderr=subprocess.DEVNULL)


def _label_events(probe, t):
    return [m.json() for m in probe.messages
            if m.topic == t.events and m.json()["type"] == "label"]


def _online(probe, t, n):
    return lambda ms: sum(m.topic == t.status and m.json()["state"] == "online"
                          for m in ms) >= n


@pytest.mark.parametrize("during", ["learning", "sleep"])
def test_sigkill_loses_no_acknowledged_label(base_bundle, broker_url, broker, mqtt_collector,
                                            unique_device, tmp_path, during):
    t = Topics(unique_device)
    state = tmp_path / "state"
    protocol = broker.protocols[-1]
    probe = mqtt_collector(t.events, t.status, t.replies)
    gen = SignalGenerator(11)
    cls = ["shake", "tilt"]
    labels = [{"id": f"k{i}", "label": cls[i % 2], "values": gen.window(cls[i % 2], 128).tolist()}
              for i in range(N_LABELS)]
    proc = _start(base_bundle, broker_url, unique_device, state, protocol)
    try:
        probe.wait_for(_online(probe, t, 1), timeout_s=30)
        if during == "sleep":
            for body in labels[:10]:
                probe.publish(t.labels, json.dumps(body), qos=1)
            probe.wait_for(lambda ms: len(_label_events(probe, t)) >= 10, timeout_s=20)
            probe.publish(t.cmd, json.dumps({"cmd": "sleep", "budget_s": 20}), qos=1)
            probe.wait_for(lambda ms: any(m.topic == t.events and m.json()["type"] == "sleep"
                                          for m in ms), timeout_s=20)
            rest = labels[10:]
        else:
            rest = labels
        for body in rest:
            probe.publish(t.labels, json.dumps(body), qos=1, wait=False)
        if during == "learning":
            probe.wait_for(lambda ms: len(_label_events(probe, t)) >= 5, timeout_s=20)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        before = {e["id"] for e in _label_events(probe, t)}
        if during == "sleep":     # the kill landed inside the running sleep
            assert [m.json()["reason"] for m in probe.messages if m.topic == t.events
                    and m.json()["type"] == "sleep"] == ["started"]
        else:                     # the kill landed while labels were still being learned
            assert len(before) < N_LABELS
        proc = _start(base_bundle, broker_url, unique_device, state, protocol)
        # Redelivered labels come first (in order, same topic and QoS), then this one; the
        # events of labels acknowledged just before the kill may never have left the
        # first process, so the learner's state is the judge, not the events.
        sentinel = {"id": "sentinel", "label": "shake", "values": labels[0]["values"]}
        probe.publish(t.labels, json.dumps(sentinel), qos=1)
        probe.wait_for(lambda ms: "sentinel" in {e["id"] for e in _label_events(probe, t)},
                       timeout_s=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with Learner.from_bundle(base_bundle, state_dir=state) as learner:
        missing = [b["id"] for b in labels if not learner.seen(f"{unique_device}/{b['id']}")]
        assert not missing, f"labels lost: {missing}"
        assert {"shake", "tilt"} <= set(learner.classes)


def test_sigkill_leaves_the_last_will_and_the_restart_skips_window_ids(
        base_bundle, broker_url, broker, mqtt_collector, unique_device, tmp_path):
    """After SIGKILL (no clean stop): the broker publishes the agent's last will, a
    retained `offline` status; the restarted agent continues window ids 1,000,000 past
    the last saved history (docs/reliability.md), so no id a label may name is handed out
    twice."""
    from tests.agent.test_daemon_learning import send, stream

    t = Topics(unique_device)
    state = tmp_path / "state"
    protocol = broker.protocols[-1]
    probe = mqtt_collector(t.status, t.predictions, t.replies)
    proc = _start(base_bundle, broker_url, unique_device, state, protocol)
    try:
        probe.wait_for(_online(probe, t, 1), timeout_s=30)
        send(probe, t.frames, stream("walk", 8))
        preds = probe.wait_for_count(8, topic=t.predictions, timeout_s=20)
        assert [p.json()["window"] for p in preds] == list(range(8))
        probe.publish(t.cmd, json.dumps({"id": "s", "cmd": "snapshot"}), qos=1)
        assert probe.wait_for_count(1, topic=t.replies, timeout_s=10)[0].json()["ok"]
        probe.clear()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        will = probe.wait_for_count(1, topic=t.status, timeout_s=10)[0]
        assert will.json()["state"] == "offline"
        late = mqtt_collector(t.status)                  # retained: a newcomer sees it too
        (retained,) = late.wait_for_count(1, topic=t.status, timeout_s=5)
        assert retained.retain and retained.json()["state"] == "offline"

        proc = _start(base_bundle, broker_url, unique_device, state, protocol)
        probe.wait_for(_online(probe, t, 1), timeout_s=30)
        send(probe, t.frames, stream("walk", 1, seq0=100, ts0=5000.0))
        pred = probe.wait_for_count(1, topic=t.predictions, timeout_s=20)[0].json()
        assert pred["window"] == 1_000_008               # last saved id 7, + 1, + the gap
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
