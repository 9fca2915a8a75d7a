"""Replay: an NPZ dataset streamed as one device's frames, with labels through the oracle."""

import json
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cli import main as reverie_main
from agent.daemon import Daemon
from agent.dataset import save_dataset
from agent.errors import ConfigError, DatasetError
from agent.protocol import decode_frame
from firmware_sim.replay import Replay, load_windows
from firmware_sim.signals import write_dataset
from tests.agent.test_daemon import agent_config

NOWHERE = "mqtt://127.0.0.1:1"


def small(path, n=6, c=3, t=20, rate=10.0, classes=("a", "b", "c"), seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, c, t)).astype(np.float32)
    y = np.arange(n) % len(classes)
    kw = {} if rate is None else {"sample_rate_hz": rate}
    return save_dataset(path, X, y, classes=list(classes), **kw)


def frames_of(replay, stream_s=None):
    return [decode_frame(m[1]) for _, m in replay.dry_run(stream_s) if m[0].endswith("/frames")]


@given(n=st.integers(1, 8), t=st.integers(1, 40), fs=st.integers(1, 50),
       seed=st.integers(0, 5))
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_frames_are_the_windows_in_a_seeded_order(tmp_path, n, t, fs, seed):
    path = small(tmp_path / f"d{n}-{t}.npz", n=n, t=t, classes=("a", "b"))
    X, y, classes, _ = load_windows(path)
    if n * t < fs:
        with pytest.raises(ConfigError, match="less than one frame"):
            Replay(path, NOWHERE, device="r", frame_samples=fs, seed=seed)
        return
    r = Replay(path, NOWHERE, device="r", frame_samples=fs, seed=seed, start_ts=100.0)
    frames = frames_of(r)
    order = np.random.default_rng([seed, 0]).permutation(n)
    stream = X[order].transpose(0, 2, 1).reshape(n * t, -1)     # (N*T, C)
    assert [f.seq for f in frames] == list(range(n * t // fs))
    got = np.concatenate([f.values for f in frames])
    np.testing.assert_array_equal(got, stream[:len(got)])        # bit for bit (float32)
    assert len(stream) - len(got) < fs                           # only a partial frame dropped
    for f in frames:
        assert f.ts == pytest.approx(100.0 + f.seq * fs / 10.0)
        first = f.seq * fs
        assert r.truth(f.seq) == classes[y[order[first // t]]]


def test_labels_cover_runs_of_one_class(tmp_path):
    path = small(tmp_path / "d.npz", n=12, classes=("a", "b"))
    labels = []
    r = Replay(path, NOWHERE, device="rec-1", frame_samples=8, labels=1.0, label_delay_s=0.5,
               start_ts=0.0, on_label=lambda d, p: labels.append((d, p)))
    msgs = list(r.dry_run())
    sent = [(due, json.loads(m[1])) for due, m in msgs if m[0] == "reverie/v1/rec-1/labels"]
    assert len(sent) == len(labels) == r.labels_sent > 1
    assert all(m[2] == 1 for _, m in msgs if "labels" in m[0])
    for due, body in sent:
        # the windows wholly inside the run: starts in [start, end - T]
        start = body["from_ts"] + 0.025
        end = body["to_ts"] + 2.0 - 0.025
        assert start == pytest.approx(round(start / 2) * 2)     # a window boundary
        samples = range(round(start * 10), round(end * 10))
        assert {r.truth_at(s) for s in samples} == {body["label"]}
        assert due >= end + 0.5 - 1e-9
        if end < 24.0:                                           # not the last run:
            assert r.truth_at(round(end * 10)) != body["label"]  # a run ends at a change
    assert sum(round((p["to_ts"] - p["from_ts"] + 2.0 - 0.05) * 10) for _, p in labels) == 240


def test_loop_continues_with_a_new_order(tmp_path):
    path = small(tmp_path / "d.npz", n=5, t=8)
    r = Replay(path, NOWHERE, device="r", frame_samples=4, loop=True, start_ts=0.0)
    frames = frames_of(r, stream_s=12.0)                         # 3 passes of 4 s
    assert [f.seq for f in frames] == list(range(len(frames))) and len(frames) == 30
    passes = np.concatenate([f.values for f in frames]).reshape(3, 5, 8, 3)
    X, _, _, _ = load_windows(path)
    orders = [[int(np.flatnonzero((X.transpose(0, 2, 1) == w).all(axis=(1, 2)))[0])
               for w in p] for p in passes]
    assert all(sorted(o) == list(range(5)) for o in orders)     # every window once a pass
    assert orders[0] != orders[1]


def test_rate_from_the_file_or_the_argument(tmp_path):
    with_rate, without = small(tmp_path / "a.npz"), small(tmp_path / "b.npz", rate=None)
    assert Replay(with_rate, NOWHERE, device="r").rate_hz == 10.0
    assert Replay(without, NOWHERE, device="r", rate_hz=25).rate_hz == 25.0
    with pytest.raises(ConfigError, match="no sample_rate_hz.*--rate"):
        Replay(without, NOWHERE, device="r")


@pytest.mark.parametrize("kwargs, match", [
    ({"rate_hz": 0}, "rate_hz"), ({"frame_samples": 0}, "frame_samples"),
    ({"labels": 1.5}, "labels"), ({"label_delay_s": -1}, "label_delay_s"),
    ({"device": "a/b"}, "device id"), ({"speed": -2}, "speed"), ({"encoding": "csv"}, "encoding"),
])
def test_bad_arguments_name_the_value(tmp_path, kwargs, match):
    path = small(tmp_path / "d.npz")
    kw = {"device": "r", **kwargs}
    with pytest.raises(ConfigError, match=match):
        Replay(path, NOWHERE, **kw)


def test_a_dataset_in_the_wrong_format_is_refused(tmp_path, capsys):
    feats = tmp_path / "feats.npz"
    save_dataset(feats, np.ones((4, 5), np.float32), np.array([0, 1, 0, 1]))
    with pytest.raises(DatasetError, match=r"feature vectors \(N, F\).*windows"):
        Replay(feats, NOWHERE, device="r", rate_hz=10)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    for path in (feats, junk, tmp_path / "missing.npz"):
        assert reverie_main(["sim", "replay", "--data", str(path), "--device", "r",
                             "--rate", "10"]) == 2
        assert str(path) in capsys.readouterr().err


def test_replay_over_the_broker_teaches_the_agent(sim_bundle, broker_url, broker,
                                                  mqtt_collector, tmp_path):
    prefix = f"test/{uuid.uuid4().hex[:10]}"
    protocol = broker.protocols[-1]
    data = write_dataset(tmp_path / "d.npz", n_per_class=2, classes=["idle", "shake"], seed=5)
    daemon = Daemon(agent_config(sim_bundle, broker_url, "rec-1", protocol, prefix=prefix))
    daemon.start()
    try:
        assert daemon.wait_connected(10)
        probe = mqtt_collector(f"{prefix}/rec-1/#", qos=1)
        sent = []
        rc = reverie_main(["sim", "replay", "--data", str(data), "--device", "rec-1",
                           "--rate", "50", "--frame-samples", "32", "--labels", "1",
                           "--label-delay", "0.5", "--speed", "8", "--broker", broker_url,
                           "--prefix", prefix, "--protocol", protocol])
        assert rc == 0
        # the replay returned once it published; the probe receives asynchronously
        frames = probe.wait_for_count(4 * 128 // 32, topic=f"{prefix}/rec-1/frames",
                                      timeout_s=10)
        assert len(frames) == 4 * 128 // 32

        def every_window_learned(ms):      # and every label the probe saw has its event
            sent_ids = {m.json()["id"] for m in ms if m.topic.endswith("/labels")}
            done = [m.json() for m in ms if m.topic.endswith("/events")
                    and m.json()["type"] == "label"]
            return sum(e["windows"] for e in done) == 4 and {e["id"] for e in done} == sent_ids

        probe.wait_for(every_window_learned, timeout_s=20)
        sent = [m.json() for m in probe.messages if m.topic.endswith("/labels")]
        events = [m.json() for m in probe.messages if m.topic.endswith("/events")]
        learned = [e for e in events if e["type"] == "label"]
        assert {e["id"] for e in learned} == {p["id"] for p in sent}
        assert all(e["reason"] == "learned" for e in learned)
        assert sum(e["windows"] for e in learned) == 4            # every window, once
        preds = probe.wait_for_count(4, topic=f"{prefix}/rec-1/predictions", timeout_s=10)
        assert len(preds) == 4
    finally:
        daemon.stop()
