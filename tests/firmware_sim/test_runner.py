"""ScenarioRunner and the engine: schedules, truth, labels, determinism, rates, the agent."""

import json
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cli import main as reverie_main
from agent.daemon import Daemon
from agent.errors import ConfigError
from agent.protocol import decode_frame
from firmware_sim.engine import Engine
from firmware_sim.runner import ScenarioRunner, label_range
from firmware_sim.scenario import load_scenario, scenario_from_dict
from tests.agent.test_daemon import agent_config

NOWHERE = "mqtt://127.0.0.1:1"  # never connected: dry runs only


def tiny(**over) -> dict:
    """A small IMU scenario as a dict; `over` replaces top-level tables."""
    d = {
        "name": "tiny", "seed": 3,
        "sensor": {"model": "imu"},
        "devices": {"count": 3, "frame_samples": 16, "window_samples": 64},
        "classes": {"base": ["idle", "walk"]},
        "phases": [{"name": "a", "duration_s": 8, "mix": {"idle": 1, "walk": 1},
                    "segment_s": [1, 2]},
                   {"name": "b", "duration_s": 8, "mix": {"walk": 1, "run": 1},
                    "segment_s": [1, 2]}],
        "labels": {"fraction": 1.0, "delay_s": 0.5, "min_segment_s": 0.5},
        "sleep": {"at_s": [10]},
    }
    d.update(over)
    return d


def messages(runner, stream_s=None):
    return [(due, topic, payload, qos, dev) for due, (topic, payload, qos, dev)
            in runner.dry_run(stream_s)]


@pytest.fixture
def prefix() -> str:
    return f"test/{uuid.uuid4().hex[:10]}"


# --- schedule, truth, labels (no broker) --------------------------------------------


def test_dry_run_frames_truth_and_on_frame_agree():
    seen = []
    r = ScenarioRunner(scenario_from_dict(tiny()), NOWHERE, start_ts=500.0,
                       on_frame=lambda *f: seen.append(f))
    msgs = messages(r)
    frames = [m for m in msgs if m[1].endswith("/frames")]
    assert r.n_frames == 50 and len(frames) == 3 * 50   # 16 s of 0.32 s frames, no faults
    assert {m[3] for m in frames} == {0}                  # QoS 0
    for device, seq, ts, values, cls in seen:
        assert values.shape == (16, 6) and values.dtype == np.float32
        assert ts == pytest.approx(500.0 + seq * 0.32)
        assert r.truth(device, seq) == cls == r.truth_at(device, seq * 16 + 15)
        assert r.truth_ts(device, ts + 0.01) == cls
    f = decode_frame(frames[0][2])
    assert (f.seq, f.ts) == (0, 500.0)
    # devices staggered within the frame period, each frame due when its last sample is taken
    assert [m[0] for m in frames[:3]] == pytest.approx([0.32, 0.32 + 0.32 / 3, 0.32 + 0.64 / 3])


def test_schedule_follows_the_phases():
    r = ScenarioRunner(scenario_from_dict(tiny()), NOWHERE)
    for device in r.devices:
        segs = r.segments(device)
        assert segs[0][0] == 0 and segs[-1][1] == pytest.approx(16.0)
        for (_, end, a), (start, _, b) in zip(segs, segs[1:], strict=False):
            assert end == start and a != b              # contiguous, one class per segment
        for start, end, cls in segs:
            assert cls in (("idle", "walk") if end <= 8 else ("walk", "run") if start >= 8
                           else ("idle", "walk", "run"))
    with pytest.raises(ValueError, match="frame 50"):
        r.truth("sim-000", 50)
    with pytest.raises(ValueError, match="Unknown device: 'x'"):
        r.truth("x", 0)


def test_labels_name_the_windows_mostly_inside_their_segment():
    labels = []
    r = ScenarioRunner(scenario_from_dict(tiny()), NOWHERE, start_ts=0.0,
                       on_label=lambda d, p: labels.append((d, p)))
    msgs = messages(r)
    sent = [(due, topic, json.loads(p)) for due, topic, p, qos, _ in msgs if "/labels" in topic]
    assert len(sent) == len(labels) == r.summary()["labels_sent"] > 5
    assert all(qos == 1 for _, t, _, qos, _ in msgs if "/labels" in t)
    half_window = 64 / 50 / 2
    for due, topic, body in sent:
        device = topic.split("/")[-2]
        seg = [s for s in r.segments(device)
               if s[0] == pytest.approx(body["from_ts"] + half_window - 0.005)]
        assert len(seg) == 1, body
        start, end, cls = seg[0]
        assert body["label"] == cls                     # no label noise configured
        assert (body["from_ts"], body["to_ts"]) == pytest.approx(
            label_range(start, end, 64 / 50, 50.0))
        assert due >= end + 0.5 - 1e-9                   # the oracle's delay after the end
    # the final segments' labels still go out, after the last frame
    last_frame_due = max(m[0] for m in msgs if m[1].endswith("/frames"))
    assert any(due > last_frame_due for due, _, _ in sent)


@given(start=st.floats(0, 1e4), length=st.integers(1, 5000), window=st.integers(2, 512),
       phase=st.integers(0, 511))
@settings(max_examples=300, deadline=None)
def test_label_range_covers_exactly_the_majority_windows(start, length, window, phase):
    rate = 50.0
    t0 = round(start * rate) / rate                     # segments start on a sample
    span = label_range(t0, t0 + length / rate, window / rate, rate)
    assert (span is None) == (length <= window)         # may hold no window start
    if span is None:
        return
    lo, hi = span
    # every window start s (on the sample grid), whatever the agent's window phase
    starts = range(-window - (phase % window), length + window, window)
    for s in starts:
        inside = min(s + window, length) - max(s, 0)
        labelled = lo <= t0 + s / rate <= hi
        assert labelled == (inside * 2 > window), (s, inside)
    assert any(lo <= t0 + s / rate <= hi for s in starts)   # never a label naming no window


def test_timeline_and_sleep_command():
    events = []
    r = ScenarioRunner(scenario_from_dict(tiny()), NOWHERE, start_ts=0.0,
                       on_event=events.append)
    kinds = [e["type"] for e in r.timeline]
    assert kinds.count("phase") == 2 and kinds.count("sleep") == 1
    new = [e for e in r.timeline if e["type"] == "new_class"]
    assert [e["class"] for e in new] == ["run"] and new[0]["t_s"] >= 8.0
    assert new[0]["t_s"] == min(s[0] for d in r.devices for s in r.segments(d) if s[2] == "run")
    msgs = messages(r)
    cmds = [m for m in msgs if m[1].endswith("/cmd")]
    assert [(m[1], json.loads(m[2]), m[3]) for m in cmds] == [
        ("reverie/v1/sim-000/cmd", {"cmd": "sleep"}, 1)]
    assert 10.0 <= cmds[0][0] < 10.4
    assert [e["type"] for e in events] == kinds
    assert all(e["ts"] == e["t_s"] for e in events)     # start_ts 0


def test_same_seed_same_payloads_other_seed_others():
    def payloads(seed, devices=None):
        sc = scenario_from_dict(tiny(seed=seed))
        return [m[2] for m in messages(ScenarioRunner(sc, NOWHERE, start_ts=1.0,
                                                      devices=devices))]

    a, b = payloads(3), payloads(3)
    assert a == b and len(a) > 100
    assert payloads(4) != a
    assert len(payloads(3, devices=5)) > len(a)


def test_network_faults_and_dropout_shape_what_is_sent():
    sc = scenario_from_dict(tiny(
        network={"disconnects": [[2.0, 3.0]], "duplicate_prob": 0.2, "reorder_prob": 0.1},
        faults=[{"kind": "dropout", "start_s": 10, "duration_s": 2, "devices": 1.0}]))
    r = ScenarioRunner(sc, NOWHERE, start_ts=0.0)
    seqs = [decode_frame(m[2]).seq for m in messages(r) if m[1] == "reverie/v1/sim-001/frames"]
    s = r.summary()
    assert s["frames_lost_disconnected"] == 3 * round(3.0 / 0.32)
    assert s["frames_silent"] == 3 * round(2.0 / 0.32)
    assert s["frames_duplicated"] > 0 and s["frames_reordered"] > 0
    assert not any(2.0 <= q * 0.32 < 5.0 for q in seqs)          # lost while disconnected
    assert not any(10.0 <= q * 0.32 < 12.0 for q in seqs)        # the sensor was dead
    assert len(seqs) != len(set(seqs)) and seqs != sorted(seqs)  # duplicates, reordering
    assert set(range(50)) - set(seqs) == {q for q in range(50)
                                          if 2.0 <= q * 0.32 < 5.0 or 10.0 <= q * 0.32 < 12.0}


def test_outbox_sends_the_disconnect_backlog_at_the_reconnect():
    sc = scenario_from_dict(tiny(network={"disconnects": [[2.0, 3.0]]}))
    r = ScenarioRunner(sc, NOWHERE, start_ts=0.0, outbox_s=1.0)
    seqs = [decode_frame(m[2]).seq for m in messages(r) if m[1] == "reverie/v1/sim-000/frames"]
    kept = round(1.0 / 0.32)                     # the newest second of the backlog
    first_back = next(q for q in range(50) if q * 0.32 >= 5.0)
    i = seqs.index(first_back - kept)
    assert seqs[i:i + kept + 1] == list(range(first_back - kept, first_back + 1))
    assert seqs[i - 1] * 0.32 < 2.0


@pytest.mark.parametrize("kwargs, match", [
    ({"devices": 0}, "devices"),
    ({"speed": 0}, "speed"),
    ({"encoding": "xml"}, "encoding"),
    ({"prefix": "a/#"}, "prefix"),
    ({"protocol": "4"}, "protocol"),
    ({"outbox_s": -1}, "outbox_s"),
])
def test_runner_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ScenarioRunner(scenario_from_dict(tiny()), NOWHERE, **kwargs)


def test_unknown_scenario_is_a_config_error():
    with pytest.raises(ConfigError, match="nope"):
        ScenarioRunner("nope", NOWHERE)


# --- the engine's slots and rate accounting --------------------------------------------


def test_engine_slots_are_staggered_absolute_deadlines():
    e = Engine(NOWHERE, ["a", "b", "c", "d"], lambda *a: None, rate_hz=100.0,
               frame_samples=10, stream_end_s=0.5)
    slots = list(e.slots())
    assert len(slots) == 4 * 4 + 1                 # due <= 0.5 s: k < 4, and (4, device 0)
    assert [s[:2] for s in slots[:5]] == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1)]
    for i, k, due in slots:
        assert due == pytest.approx((k + 1 + i / 4) * 0.1)
    assert len(list(Engine(NOWHERE, ["a"], lambda *a: None, rate_hz=100.0, frame_samples=10,
                           max_frames=7).slots())) == 7


def test_rate_accounting_over_the_broker(broker_url, mqtt_collector, prefix, broker):
    protocol = broker.protocols[-1]
    probe = mqtt_collector(f"{prefix}/+/frames", qos=0)
    sc = scenario_from_dict(tiny(devices={"count": 4, "frame_samples": 10,
                                          "window_samples": 64},
                                 phases=[{"name": "a", "duration_s": 2.0,
                                          "mix": {"idle": 1, "walk": 1}}],
                                 labels={"fraction": 0.0}, sleep={"at_s": []}))
    r = ScenarioRunner(sc, broker_url, prefix=prefix, protocol=protocol, speed=2.0)
    stats = r.run()
    assert stats.frames_sent == dict.fromkeys(r.devices, 10)    # 2 s at 50 Hz, 10 per frame
    assert stats.frames_dropped == 0 and stats.messages_sent == 40
    assert stats.bytes_sent == 40 * (24 + 10 * 6 * 4)
    assert stats.target_sample_rate_hz == 100.0
    assert stats.stream_s == pytest.approx((10 + 3 / 4) * 0.2)   # the last slot's deadline
    # loose bounds: machines are noisy
    assert 0.5 * 100 < stats.min_sample_rate_hz <= stats.sample_rate_hz < 2 * 100
    assert 0.5 < stats.speed_achieved < 4
    got = probe.wait_for_count(40, timeout_s=10)
    assert len({m.topic for m in got}) == 4


# --- end to end: the smoke scenario against the real agent ----------------------------


def test_smoke_scenario_end_to_end_against_the_agent(sim_bundle, broker_url, broker,
                                                     mqtt_collector, prefix):
    protocol = broker.protocols[-1]
    daemon = Daemon(agent_config(sim_bundle, broker_url, "+", protocol, prefix=prefix))
    daemon.start()
    try:
        assert daemon.wait_connected(10)
        probe = mqtt_collector(f"{prefix}/+/predictions", f"{prefix}/+/events",
                               f"{prefix}/+/replies")
        sent_labels, events = [], []
        r = ScenarioRunner("smoke", broker_url, prefix=prefix, protocol=protocol, speed=4.0,
                           on_label=lambda d, p: sent_labels.append(p), on_event=events.append)
        stats = r.run()
        assert stats.frames_dropped == 0 and sent_labels
        assert r.summary()["sleeps_sent"] == 1

        def label_events(msgs):
            return [m.json() for m in msgs if m.topic.endswith("/events")
                    and m.json().get("type") == "label"]

        def answers(msgs):  # a label event, or an error naming a label
            return label_events(msgs) + [
                m.json() for m in msgs if m.topic.endswith("/events")
                and m.json().get("type") == "error" and "label " in m.json().get("detail", "")]

        probe.wait_for(lambda ms: len(answers(ms)) >= len(sent_labels), timeout_s=20)
        assert answers(probe.messages) == label_events(probe.messages)   # no label refused
        learned = label_events(probe.messages)
        assert {e["id"] for e in learned} == {p["id"] for p in sent_labels}
        assert all(e["reason"] == "learned" and e["windows"] >= 1 for e in learned)
        preds = [m.json() for m in probe.messages if m.topic.endswith("/predictions")]
        assert {p["device"] for p in preds} == set(r.devices)
        reply = next(m.json() for m in probe.wait_for(
            lambda ms: any(m.topic.endswith("/replies") for m in ms), timeout_s=10)
            if m.topic.endswith("/replies"))
        assert reply["cmd"] == "sleep" and reply["ok"] is True
        assert [e["type"] for e in events] == [e["type"] for e in r.timeline]
    finally:
        daemon.stop()


# --- the CLI ----------------------------------------------------------------------------


def test_cli_scenario_runs(broker_url, broker, mqtt_collector, prefix, capsys, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("""
name = "cli"
[sensor]
model = "imu"
[devices]
count = 2
frame_samples = 25
window_samples = 50
[classes]
base = ["idle"]
[[phases]]
name = "only"
duration_s = 2
mix = { idle = 1 }
""")
    probe = mqtt_collector(f"{prefix}/+/frames", qos=0)
    rc = reverie_main(["sim", "--scenario", str(path), "--broker", broker_url, "--speed", "4",
                       "--devices", "3", "--prefix", prefix,
                       "--protocol", broker.protocols[-1]])
    out = capsys.readouterr().out
    assert rc == 0 and "scenario 'cli'" in out and "phase" in out
    got = probe.wait_for_count(3 * 4, timeout_s=10)
    assert {m.topic.split("/")[-2] for m in got} == {"sim-000", "sim-001", "sim-002"}


def test_cli_bad_scenario_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nspeed = 3\n')
    assert reverie_main(["sim", "--scenario", str(path)]) == 2
    assert "speed" in capsys.readouterr().err


def test_shipped_scenarios_build_runners():
    from firmware_sim.scenario import list_scenarios

    for name in list_scenarios():
        r = ScenarioRunner(load_scenario(name), NOWHERE)
        assert r.n_frames > 0 and r.timeline[0]["type"] == "phase"
