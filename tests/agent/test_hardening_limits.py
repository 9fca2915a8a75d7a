"""Issue 13, findings 7 and 9: time and size budgets of a real daemon on mosquitto.

* Group commit: a label naming 40 windows costs one fsync of the learner's log before
  its PUBACK, not 40 (counted on the real `WriteAheadLog`).
* Per-loop budget: while a label naming 64 windows is learned, frames keep flowing: a
  window sent after the label is predicted before the label is done (the worker used to
  learn the whole label, 32 of them per loop, before looking at a frame again: a 15 s
  gap between watchdog pings).
* Sizes before buffering: the daemon announces MQTT 5 Maximum Packet Size, so mosquitto
  never delivers a payload far beyond the limit (it is not even received); one just over
  is refused from its size (``oversized``) without being queued; the queues are bounded
  in bytes (``ingest.max_queue_bytes``).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from agent.config import IngestConfig
from agent.daemon import Daemon
from agent.persist.wal import WriteAheadLog
from agent.protocol import encode_frame_binary
from agent.topics import Topics
from tests.agent.test_daemon import agent_config
from tests.agent.test_daemon_learning import events, send, stream


@pytest.fixture
def make_daemon(base_bundle, start_daemon):
    return lambda device, protocol=None, **kw: start_daemon(base_bundle, device, protocol, **kw)


def test_a_label_of_many_windows_costs_one_fsync(make_daemon, mqtt_collector, unique_device,
                                                 tmp_path, monkeypatch):
    fsyncs = []
    real = WriteAheadLog._fsync

    def counting(self, drop_from):
        if self.directory.name == "wal":          # the learner's log, not the history's
            fsyncs.append(drop_from)
        return real(self, drop_from)

    monkeypatch.setattr(WriteAheadLog, "_fsync", counting)
    make_daemon(unique_device, state_dir=tmp_path / "state")
    t = Topics(unique_device)
    probe = mqtt_collector(t.predictions, t.events)
    send(probe, t.frames, stream("shake", 40))
    ids = [m.json()["window"] for m in probe.wait_for_count(40, topic=t.predictions,
                                                              timeout_s=30)]
    fsyncs.clear()
    probe.publish(t.labels, json.dumps({"id": "g", "label": "shake", "windows": ids}), qos=1)
    probe.wait_for(lambda ms: events(probe, t.events, "label"), timeout_s=30)
    ev = events(probe, t.events, "label")[0]
    assert ev["windows"] == 40 and ev["stored"] >= 1
    assert len(fsyncs) == 1, fsyncs


def test_frames_keep_flowing_while_a_long_label_is_learned(make_daemon, mqtt_collector,
                                                           unique_device, tmp_path):
    make_daemon(unique_device, state_dir=tmp_path / "state",
                ingest=IngestConfig(loop_budget_s=1e-6))   # one window per loop at most
    t = Topics(unique_device)
    probe = mqtt_collector(t.predictions, t.events)
    send(probe, t.frames, stream("shake", 64))
    ids = [m.json()["window"] for m in probe.wait_for_count(64, topic=t.predictions,
                                                              timeout_s=30)]
    probe.clear()
    probe.publish(t.labels, json.dumps({"id": "long", "label": "shake", "windows": ids}),
                  qos=1)
    send(probe, t.frames, stream("idle", 1, seq0=64 * 4))
    probe.wait_for(lambda ms: events(probe, t.events, "label"), timeout_s=60)
    order = [("prediction" if m.topic == t.predictions else m.json()["type"])
             for m in probe.messages if m.topic == t.predictions
             or (m.topic == t.events and m.json()["type"] == "label")]
    assert order.index("prediction") < order.index("label"), order
    assert events(probe, t.events, "label")[0]["windows"] == 64


def test_a_payload_far_beyond_the_limit_is_never_delivered_and_one_just_over_not_queued(
        make_daemon, mqtt_collector, unique_device, broker):
    if "5" not in broker.protocols:
        pytest.skip("Maximum Packet Size is MQTT 5")
    d = make_daemon(unique_device, protocol="5", ingest=IngestConfig(max_payload_bytes=1024))
    t = Topics(unique_device)
    probe = mqtt_collector(t.predictions, t.events, protocol="5")
    huge = encode_frame_binary(0, 1.0, np.zeros((4096, 6), np.float32)) * 3   # ~300 KB
    over = b'{"seq": 0, "ts": 1, "values": [[1, 2, 3, 4, 5, 6]]}' + b" " * 2000
    for payload in (huge, over):
        probe.publish(t.frames, payload, qos=1)
    send(probe, t.frames, stream("shake", 1))
    probe.wait_for_count(1, topic=t.predictions, timeout_s=20)
    received = d.metrics.messages_received.labels(kind="frames").value()
    assert received == 1 + 4, received            # `over` and the window's 4 frames
    errors = events(probe, t.events, "error")
    assert [e["reason"] for e in errors] == ["oversized"], errors
    assert f"{len(over)} bytes" in errors[0]["detail"]


def test_queues_are_bounded_in_bytes(base_bundle, broker_url, broker, unique_device):
    d = Daemon(agent_config(base_bundle, broker_url, unique_device, broker.protocols[-1],
                            ingest=IngestConfig(max_payload_bytes=1024, max_queue_bytes=4096)))
    t = Topics(unique_device)

    def deliver(topic, payload, qos=0):
        d._on_message(None, None, SimpleNamespace(topic=topic, payload=payload, mid=1, qos=qos,
                                                  properties=None))

    for _ in range(6):
        deliver(t.frames, b"x" * 1000)
    assert d._frames.qsize() == 4 and d.queued_bytes.used == 4000
    assert d.metrics.dropped.labels(reason="queue_full").value() == 2
    deliver(t.labels, b"y" * 1000)             # QoS 0 control: bounded by the same budget
    assert d.metrics.dropped.labels(reason="control_queue_full").value() == 1
    deliver(t.frames, b"z" * 100_000)          # oversized: kept by its size only
    assert d.queued_bytes.used == 4000 and d.metrics.dropped.labels(
        reason="queue_full").value() == 2
