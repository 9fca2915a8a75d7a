import socket
import threading
import time
import uuid

import numpy as np
import pytest

from agent.cli import main as reverie_main
from agent.dataset import load_dataset
from agent.errors import BrokerError, ConfigError
from agent.protocol import BINARY_MAGIC, decode_frame
from firmware_sim.signals import CLASSES, SAMPLE_RATE_HZ
from firmware_sim.sim import DeviceStream, Simulator

FRAME_S = 16 / SAMPLE_RATE_HZ


@pytest.fixture
def prefix() -> str:
    return f"test/{uuid.uuid4().hex[:10]}"  # every test its own topics


@pytest.fixture
def protocol(broker) -> str:
    return "5" if "5" in broker.protocols else "3.1.1"


# --- DeviceStream: schedule and ground truth, no broker ---------------------------


def test_stream_frames_and_truth_agree():
    stream = DeviceStream("d", seed=4, segment_s=(0.5, 1.5), frame_samples=8)
    classes = []
    for expected_seq in range(200):
        seq, first, values, cls = stream.next_frame()
        assert (seq, first) == (expected_seq, expected_seq * 8)
        assert values.shape == (8, 6)
        classes.append(cls)
    assert [stream.truth(s) for s in range(200)] == classes
    segments = stream.segments()
    assert len(segments) > 5
    for (a0, a1, a_cls), (b0, _, b_cls) in zip(segments, segments[1:], strict=False):
        assert a1 == b0 and a0 % 8 == 0 and a_cls != b_cls  # whole frames, classes alternate
        assert stream.truth_at(a0) == a_cls and stream.truth_at(a1 - 1) == a_cls
    assert set(classes) <= set(CLASSES)


def test_stream_truth_only_for_generated_samples():
    stream = DeviceStream("d", seed=0, frame_samples=16)
    stream.next_frame()
    assert stream.truth_at(15) in CLASSES
    with pytest.raises(ValueError, match="sample 16"):
        stream.truth_at(16)


def test_stream_single_class():
    stream = DeviceStream("d", seed=0, classes=["tilt"], segment_s=(0.1, 0.2))
    assert {stream.next_frame()[3] for _ in range(50)} == {"tilt"}


def test_simulator_streams_are_deterministic_and_distinct():
    def first_frames(seed):
        sim = Simulator("mqtt://127.0.0.1:1", devices=2, seed=seed)  # never connects
        return [sim.stream(d).next_frame()[2] for d in sim.devices]

    a, b, c = first_frames(1), first_frames(1), first_frames(2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], a[1])  # devices differ
    assert not np.allclose(a[0], c[0])


@pytest.mark.parametrize("kwargs, match", [
    ({"devices": 0}, "devices"),
    ({"devices": ["a", "a"]}, "devices"),
    ({"devices": ["bad/id"]}, "device id"),
    ({"prefix": "a/#"}, "prefix"),
    ({"speed": 0}, "speed"),
    ({"duration_s": -1}, "duration_s"),
    ({"encoding": "xml"}, "encoding"),
    ({"protocol": "4"}, "protocol"),
    ({"classes": ["walk", "swim"]}, "swim"),
    ({"segment_s": (5, 1)}, "segment_s"),
    ({"frame_samples": 0}, "frame_samples"),
])
def test_simulator_rejects_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Simulator("mqtt://127.0.0.1:1883", **kwargs)


def test_device_ids():
    assert Simulator("mqtt://127.0.0.1:1", devices=3).devices == ("sim-000", "sim-001", "sim-002")
    assert Simulator("mqtt://127.0.0.1:1", devices="pump-7").devices == ("pump-7",)


def test_unknown_device_truth():
    sim = Simulator("mqtt://127.0.0.1:1", devices=1)
    with pytest.raises(ValueError, match="Unknown device: 'nope'"):
        sim.truth("nope", 0)


# --- connection failures -----------------------------------------------------------


def test_refused_connection_names_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    sim = Simulator(f"mqtt://127.0.0.1:{port}", duration_s=1)
    with pytest.raises(BrokerError, match=f"127.0.0.1:{port}"):
        sim.run()


def test_no_connack_times_out():
    with socket.socket() as server:  # accepts TCP (backlog) but never speaks MQTT
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"mqtt://127.0.0.1:{server.getsockname()[1]}"
        sim = Simulator(url, duration_s=1, connect_timeout_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(BrokerError, match=f"No CONNACK.*{url}"):
            sim.start()
        assert time.monotonic() - t0 < 3


# --- over the real broker ----------------------------------------------------------


def _run_and_collect(broker_url, mqtt_collector, prefix, protocol, **kwargs):
    probe = mqtt_collector(f"{prefix}/+/frames", qos=0)
    sent = []  # (device, seq, ts, values, cls) from on_frame
    sim = Simulator(broker_url, prefix=prefix, protocol=protocol,
                    on_frame=lambda *frame: sent.append(frame), **kwargs)
    stats = sim.run()
    total = sum(stats.frames_sent.values())
    messages = probe.wait_for_count(total, timeout_s=5)
    return sim, stats, sent, messages


def test_frames_over_the_broker_json(broker_url, mqtt_collector, prefix, protocol):
    sim, stats, sent, messages = _run_and_collect(
        broker_url, mqtt_collector, prefix, protocol, devices=3, duration_s=1.5, speed=4,
        segment_s=(0.5, 1.0), start_ts=1000.0, seed=7)
    assert stats.frames_dropped == 0 and len(messages) == len(sent)
    by_device: dict[str, list] = {}
    for msg in messages:
        device = msg.topic.split("/")[-2]
        by_device.setdefault(device, []).append(decode_frame(msg.payload))
    assert sorted(by_device) == ["sim-000", "sim-001", "sim-002"]
    sent_values = {(d, seq): values for d, seq, _, values, _ in sent}
    for device, frames in by_device.items():
        assert [f.seq for f in frames] == list(range(len(frames)))  # from 0, no gaps
        assert len(frames) == stats.frames_sent[device]
        for f in frames:
            assert (f.n_samples, f.n_channels) == (16, 6)
            assert f.ts == pytest.approx(1000.0 + f.seq * FRAME_S)
            np.testing.assert_allclose(f.values, sent_values[device, f.seq], rtol=1e-6)
    # ground truth: what on_frame reported, for frames and their samples
    for device, seq, _, _, cls in sent:
        assert sim.truth(device, seq) == cls == sim.truth_at(device, seq * 16 + 15)
    assert len({cls for *_, cls in sent}) > 1  # classes changed over time
    # pacing: loose bounds, machines are noisy
    expected_frames = 1.5 * 4 * SAMPLE_RATE_HZ / 16  # 18.75 per device
    assert all(0.6 * expected_frames <= n <= expected_frames + 1
               for n in stats.frames_sent.values())
    assert stats.sample_rate_hz == pytest.approx(stats.target_sample_rate_hz, rel=0.3)
    assert stats.target_sample_rate_hz == 200


def test_frames_over_the_broker_binary(broker_url, mqtt_collector, prefix, protocol,
                                       unique_device):
    _, stats, sent, messages = _run_and_collect(
        broker_url, mqtt_collector, prefix, protocol, devices=[unique_device],
        duration_s=0.5, speed=8, encoding="binary", frame_samples=10)
    assert len(messages) == len(sent) == stats.frames_sent[unique_device] > 0
    for msg, (_, seq, ts, values, _) in zip(messages, sent, strict=True):
        assert msg.topic == f"{prefix}/{unique_device}/frames" and msg.qos == 0
        assert msg.payload[:2] == BINARY_MAGIC
        frame = decode_frame(msg.payload)
        assert (frame.seq, frame.ts) == (seq, ts)
        np.testing.assert_array_equal(frame.values, values)  # float32, bit for bit


def test_mqtt_311(broker_url, mqtt_collector, prefix):
    _, stats, sent, messages = _run_and_collect(
        broker_url, mqtt_collector, prefix, "3.1.1", duration_s=0.3, speed=8)
    assert len(messages) == len(sent) > 0


def test_start_stop_join(broker_url, mqtt_collector, prefix, protocol):
    probe = mqtt_collector(f"{prefix}/+/frames", qos=0)
    got_frames = threading.Event()
    sim = Simulator(broker_url, devices=2, duration_s=None, prefix=prefix, speed=10,
                    protocol=protocol, on_frame=lambda *f: got_frames.set())
    sim.start()
    assert sim.join(timeout=0.05) is None  # still running
    assert got_frames.wait(5)
    probe.wait_for_count(4, timeout_s=5)
    sim.stop()
    stats = sim.join(timeout=5)
    assert stats is not None and min(stats.frames_sent.values()) >= 2


def test_on_frame_error_surfaces_in_join(broker_url, prefix, protocol):
    def boom(*frame):
        raise RuntimeError("callback failed")

    sim = Simulator(broker_url, duration_s=None, prefix=prefix, speed=10,
                    protocol=protocol, on_frame=boom)
    sim.start()
    with pytest.raises(RuntimeError, match="callback failed"):
        sim.join(timeout=5)


# --- the CLI -----------------------------------------------------------------------


def test_cli_sim_runs_briefly(broker_url, mqtt_collector, prefix, protocol, capsys):
    probe = mqtt_collector(f"{prefix}/+/frames", qos=0)
    rc = reverie_main(["sim", "--broker", broker_url, "--devices", "2", "--duration", "0.6",
                       "--speed", "4", "--encoding", "binary", "--seed", "3",
                       "--prefix", prefix, "--protocol", protocol])
    assert rc == 0
    assert "sent" in capsys.readouterr().out
    frames = probe.wait_for_count(4, timeout_s=5)
    assert {m.topic for m in frames} == {f"{prefix}/sim-000/frames", f"{prefix}/sim-001/frames"}


def test_cli_sim_unreachable_broker_exits_2(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert reverie_main(["sim", "--broker", f"mqtt://127.0.0.1:{port}", "--duration", "1"]) == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


def test_cli_dataset(tmp_path, capsys):
    out = tmp_path / "imu.npz"
    rc = reverie_main(["sim", "dataset", "--out", str(out), "--n-per-class", "5",
                       "--classes", "idle,walk,shake", "--seed", "2"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    ds = load_dataset(out)
    assert ds.classes == ("idle", "walk", "shake") and ds.input_shape == (6, 128)
    assert reverie_main(["sim", "dataset", "--out", str(out), "--classes", "swim"]) == 2


def test_cli_module_is_cheap_to_import():
    import subprocess
    import sys

    code = ("import sys, firmware_sim.cli; "
            "print(any(m.startswith(('paho', 'torch', 'numpy')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
