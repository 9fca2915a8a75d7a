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
        assert len(before) < N_LABELS or during == "sleep"
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
