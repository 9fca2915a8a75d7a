"""What the daemon says while it cannot reach its broker, and how it reports a device whose
every frame is refused or a re-started simulator: a line per backoff step or per interval
with a count, never a line per attempt or per frame (issue 17)."""

from __future__ import annotations

import logging
import socket
import threading

import numpy as np
import pytest

from agent.daemon import Daemon
from agent.daemon_mqtt import SILENCE_S, ConnectionReport
from agent.protocol import encode_frame_binary
from agent.ratelimit import Throttle
from agent.topics import Topics
from tests.agent.test_daemon import _frames, agent_config


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_line_per_backoff_step_not_per_attempt():
    clock = Clock()
    r = ConnectionReport("mqtt://127.0.0.1:1", "5", backoff_max_s=1.5, clock=clock)
    lines = []
    for _ in range(20):
        clock.t += 1.5
        lines.append(r.failed("Connection refused"))
    said = [i + 1 for i, line in enumerate(lines) if line]
    assert said == [1, 2, 4, 8, 16]
    assert lines[0].startswith("cannot reach the broker at mqtt://127.0.0.1:1: Connection "
                               "refused; retrying")
    assert "after 16 attempts in 24 s" in lines[15]
    assert r.connected().startswith("reached the broker at mqtt://127.0.0.1:1 after 20 failed")
    r.lost()                                    # a new outage starts counting afresh
    assert r.failed("Connection refused") is not None and r.failures == 1


def test_protocol_refusals_carry_the_hint_and_silence_is_said_once():
    clock = Clock()
    r = ConnectionReport("mqtt://h:1883", "5", clock=clock)
    line = r.failed("the broker closed the connection before CONNACK (Unspecified error)")
    assert "try --protocol 3.1.1" in line
    assert "--protocol" not in ConnectionReport("mqtt://h:1883", "3.1.1").failed(
        "the broker refused the connection: Unsupported protocol version")
    quiet = ConnectionReport("mqtt://h:1883", "5", clock=clock)
    assert quiet.silent(tcp_open=True) is None
    clock.t += SILENCE_S
    said = quiet.silent(tcp_open=True)
    assert "accepted the TCP connection but sent no CONNACK" in said and "3.1.1" in said
    assert quiet.silent(tcp_open=True) is None


def test_throttle_counts_what_it_held_back():
    clock = Clock()
    t = Throttle(10.0, max_keys=2, clock=clock)
    assert [t.hit("a") for _ in range(5)] == [1, None, None, None, None]
    clock.t += 10
    assert t.hit("a") == 5                      # 4 held back + this one
    assert t.hit("b") == 1 and t.hit("c") == 1  # "a" is forgotten: at most max_keys
    assert t.hit("a") == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Lines(logging.Handler):
    def __init__(self, needle: str):
        super().__init__(logging.WARNING)
        self.needle, self.lines, self.seen = needle, [], threading.Event()

    def emit(self, record):
        msg = record.getMessage()
        self.lines.append(msg)
        if self.needle in msg:
            self.seen.set()


def test_a_daemon_without_its_broker_says_why(sim_bundle, unique_device):
    url = f"mqtt://127.0.0.1:{_closed_port()}"
    handler = _Lines("cannot reach the broker")
    logger = logging.getLogger("reverie.daemon")
    logger.addHandler(handler)
    d = Daemon(agent_config(sim_bundle, url, unique_device))
    try:
        d.start()
        assert handler.seen.wait(30)
    finally:
        d.stop()
        logger.removeHandler(handler)
    line = next(m for m in handler.lines if "cannot reach the broker" in m)
    assert url in line and "refused" in line.lower()


@pytest.fixture
def daemon(sim_bundle, start_daemon, unique_device):
    return start_daemon(sim_bundle, unique_device)


def test_a_device_of_refused_frames_gets_one_event_with_a_count(daemon, mqtt_collector,
                                                                unique_device, caplog):
    t = Topics(unique_device)
    probe = mqtt_collector(t.events, t.predictions)
    three = np.ones((16, 3), np.float32)          # the model takes 6 channels
    with caplog.at_level(logging.WARNING, logger="reverie.worker"):
        for seq in range(40):
            probe.publish(t.frames, encode_frame_binary(seq, 1000.0 + seq, three), qos=1)
        # then good frames: their predictions show the bad ones were all handled
        for seq, ts, values in _frames("idle", 1, seq0=40):
            probe.publish(t.frames, encode_frame_binary(seq, ts, values), qos=1)
        probe.wait_for_count(1, topic=t.predictions, timeout_s=10)
    events = [m.json() for m in probe.messages if m.topic == t.events]
    assert [e["reason"] for e in events] == ["bad_channels"]
    assert "one line every 10 s with the count" in events[0]["detail"]
    assert daemon.counters()["dropped"]["bad_channels"] == 40
    assert len([r for r in caplog.records if "bad_channels" in r.getMessage()
                or "channels, the model expects" in r.getMessage()]) == 1


def test_a_restarted_short_stream_is_predicted_again(daemon, mqtt_collector, unique_device):
    """A second short run of a device (seq from 0 again, later timestamps): its windows are
    predicted, not dropped as duplicates (a re-run `reverie sim`)."""
    t = Topics(unique_device)
    probe = mqtt_collector(t.predictions)
    for run, t0 in enumerate((1000.0, 1060.0)):
        for seq, _ts, values in _frames("walk", 2):      # 8 frames: seq 0..7, < 32
            probe.publish(t.frames, encode_frame_binary(seq, t0 + seq * 0.64, values), qos=1)
        probe.wait_for_count(2 * (run + 1), topic=t.predictions, timeout_s=10)
    preds = [m.json() for m in probe.messages]
    assert [p["window"] for p in preds] == [0, 1, 2, 3]
    assert [p["seq_first"] for p in preds] == [0, 4, 0, 4]
    assert daemon.counters()["sequence"]["restarts"] == 1
