"""Issue 13, finding 3: one hostile frame or one failing learner costs only its own device.

A real gateway daemon on the session's mosquitto: good devices stream windows while an
attacker sends frames of +-3e38 (finite float32, so past every type check); every good
window is still predicted and kept in the history (a label for it is learned), and the
attacker's frames are refused with a counted reason. The second line of defence (the
range check switched off: the encoder turns the frame into NaN latents) isolates the
window too. In per-device mode a learner that cannot be opened (its state directory
cannot be created) costs only its device; past ``agent.max_learners`` a device still gets
predictions but its labels are refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.config import IngestConfig
from agent.protocol import encode_frame_binary
from agent.topics import Topics
from agent.value_range import ValueRange
from tests.agent.test_daemon_learning import events, send, stream

GOOD = ("g1", "g2", "g3")


@pytest.fixture
def gateway(base_bundle, start_daemon):
    return lambda prefix, **kw: start_daemon(base_bundle, "+", prefix=prefix, **kw)


def _hostile(seq: int) -> bytes:
    values = np.full((128, 6), 3e38, np.float32)
    values[::2] = -3e38
    return encode_frame_binary(seq, 5000.0 + seq, values)


@pytest.mark.parametrize("range_check", ["on", "off"])
def test_a_hostile_frame_costs_no_other_device_a_prediction_or_a_window(
        gateway, mqtt_collector, unique_device, range_check, monkeypatch):
    prefix = f"hi/{unique_device}"
    ingest = IngestConfig() if range_check == "on" else \
        IngestConfig(value_range_k=1e40, max_abs_value=1e39)    # only the latent check left
    d = gateway(prefix, ingest=ingest)
    if range_check == "off":
        # Whether +-3e38 overflows depends on the architecture (cnn1d: NaN latents; bounded
        # features do not); make the encoder overflow on it, as the audit's did.
        real = d.encoder.encode

        def overflowing(x):
            h = real(x)
            h[np.abs(x).reshape(len(x), -1).max(axis=1) > 1e30] = np.nan
            return h

        monkeypatch.setattr(d.encoder, "encode", overflowing)
    probe = mqtt_collector(f"{prefix}/+/predictions", f"{prefix}/+/events")
    evil = Topics("evil", prefix)
    n_windows = 8
    frames = {dev: stream("shake", n_windows, seed=i) for i, dev in enumerate(GOOD)}
    # interleaved, so hostile and good windows share the worker's batches
    for k in range(len(frames[GOOD[0]])):
        for dev in GOOD:
            seq, ts, values = frames[dev][k]
            probe.publish(Topics(dev, prefix).frames, encode_frame_binary(seq, ts, values),
                          qos=0, wait=False)
        if k % 4 == 3:
            probe.publish(evil.frames, _hostile(k // 4), qos=0, wait=False)
    reason = "out_of_range" if range_check == "on" else "non_finite_latent"
    probe.wait_for(lambda ms: sum(m.topic.endswith("/predictions") for m in ms)
                   >= n_windows * len(GOOD)
                   and len([m for m in ms if m.topic == evil.events]) >= 1, timeout_s=30)
    for dev in GOOD:
        preds = [m.json() for m in probe.messages
                 if m.topic == Topics(dev, prefix).predictions]
        assert [p["window"] for p in preds] == list(range(n_windows)), dev
    assert not [m for m in probe.messages if m.topic == evil.predictions]
    refused = events(probe, evil.events, "error")
    assert refused and all(e["reason"] == reason for e in refused), refused
    if range_check == "on":
        assert "3e+38" in refused[0]["detail"] and "ingest.value_range_k" in refused[0]["detail"]
    assert d.metrics.dropped.labels(reason=reason).value() >= 1
    # every good window is in the history: a label for all of them is learned
    g = Topics(GOOD[0], prefix)
    probe.publish(g.labels, json.dumps({"id": "all", "label": "shake",
                                        "windows": list(range(n_windows))}), qos=1)
    probe.wait_for(lambda ms: events(probe, g.events, "label"), timeout_s=20)
    ev = events(probe, g.events, "label")[0]
    assert ev["windows"] == n_windows and not events(probe, g.events, "error")


def test_a_learner_that_cannot_open_costs_only_its_device(gateway, mqtt_collector,
                                                          unique_device, tmp_path):
    state = tmp_path / "state"
    (state / "devices").mkdir(parents=True)
    (state / "devices" / "broken").write_text("not a directory")   # its state dir cannot exist
    prefix = f"hl/{unique_device}"
    d = gateway(prefix, learner_mode="per_device", state_dir=state)
    probe = mqtt_collector(f"{prefix}/+/predictions", f"{prefix}/+/events")
    good, broken = Topics("fine", prefix), Topics("broken", prefix)
    for (s1, t1, v1), (s2, t2, v2) in zip(stream("shake", 4, seed=1), stream("shake", 4, seed=2),
                                          strict=True):
        probe.publish(good.frames, encode_frame_binary(s1, t1, v1), qos=0, wait=False)
        probe.publish(broken.frames, encode_frame_binary(s2, t2, v2), qos=0, wait=False)
    ids = [m.json()["window"] for m in probe.wait_for_count(4, topic=good.predictions,
                                                              timeout_s=20)]
    probe.wait_for(lambda ms: events(probe, broken.events, "error"), timeout_s=10)
    err = events(probe, broken.events, "error")[0]
    assert err["reason"] == "learner_failed" and "broken" in err["detail"]
    # the broken device is still predicted (from the bundle), its labels wait
    probe.wait_for_count(4, topic=broken.predictions, timeout_s=20)
    assert [dev for dev, _ in d.learners()] == ["fine"]
    probe.publish(good.labels, json.dumps({"id": "l", "label": "shake", "windows": ids}), qos=1)
    probe.wait_for(lambda ms: events(probe, good.events, "label"), timeout_s=20)
    assert events(probe, good.events, "label")[0]["reason"] == "learned"
    assert "shake" in d.learner_for("fine").classes


def test_beyond_max_learners_a_device_is_predicted_but_not_taught(gateway, mqtt_collector,
                                                                   unique_device, tmp_path):
    prefix = f"hm/{unique_device}"
    d = gateway(prefix, learner_mode="per_device", state_dir=tmp_path / "s", max_learners=1)
    probe = mqtt_collector(f"{prefix}/+/predictions", f"{prefix}/+/events")
    first, second = Topics("first", prefix), Topics("second", prefix)
    for seq, ts, values in stream("shake", 2):
        probe.publish(first.frames, encode_frame_binary(seq, ts, values), qos=0)
    probe.wait_for_count(2, topic=first.predictions, timeout_s=20)
    for seq, ts, values in stream("shake", 2):
        probe.publish(second.frames, encode_frame_binary(seq, ts, values), qos=0)
    probe.wait_for_count(2, topic=second.predictions, timeout_s=20)
    probe.publish(second.labels, json.dumps({"id": "x", "label": "shake", "window": 0}), qos=1)
    def refused():
        return [e for e in events(probe, second.events, "error")
                if e.get("topic") == second.labels]

    probe.wait_for(lambda ms: refused(), timeout_s=10)
    err = refused()
    assert err and err[0]["reason"] == "no_learner" and "agent.max_learners=1" in err[0]["detail"]
    assert [dev for dev, _ in d.learners()] == ["first"]
    assert not (tmp_path / "s" / "devices" / "second").exists()


def test_value_range_from_the_bundle_statistics(base_bundle):
    from agent.bundle import load_bundle

    b = load_bundle(base_bundle)
    norm = b.manifest["normalization"]
    r = ValueRange.from_manifest(b.manifest, 6, k=10, max_abs=1e6)
    mean, std = np.array(norm["mean"]), np.array(norm["std"])
    np.testing.assert_allclose(r.lo, mean - 10 * std)
    np.testing.assert_allclose(r.hi, mean + 10 * std)
    # without statistics: the absolute bound alone
    r = ValueRange.from_manifest({}, 6, k=10, max_abs=5.0)
    assert r.lo.tolist() == [-5.0] * 6 and r.hi.tolist() == [5.0] * 6
    r.check(np.full((3, 6), 5.0, np.float32), "frame")
    with pytest.raises(Exception, match=r"values\[0\]\[0\]=5.5 is outside"):
        r.check(np.full((3, 6), 5.5, np.float32), "frame")


def test_only_allowed_devices_get_learners_and_only_changed_ones_are_checkpointed(
        gateway, mqtt_collector, unique_device, tmp_path):
    state = tmp_path / "s"
    prefix = f"ha/{unique_device}"
    d = gateway(prefix, learner_mode="per_device", state_dir=state,
                learner_devices=("a", "b"))
    probe = mqtt_collector(f"{prefix}/+/predictions", f"{prefix}/+/events")
    a, b, c = (Topics(x, prefix) for x in "abc")
    for t in (a, b, c):
        send(probe, t.frames, stream("shake", 2))
    for t in (a, b, c):
        probe.wait_for_count(2, topic=t.predictions, timeout_s=20)
    assert sorted(dev for dev, _ in d.learners()) == ["a", "b"]
    err = [e for e in events(probe, c.events, "error") if e["reason"] == "no_learner"]
    assert err and "agent.learner_devices" in err[0]["detail"]
    probe.publish(a.labels, json.dumps({"id": "la", "label": "shake", "windows": [0, 1]}),
                  qos=1)
    probe.wait_for(lambda ms: events(probe, a.events, "label"), timeout_s=20)
    # a periodic checkpoint writes the learner that learned, not the idle one
    assert list(d.pool.checkpoint(changed_only=True)) == ["a"]
    assert d.pool.checkpoint(changed_only=True) == {}          # nothing changed since
    assert not (state / "devices" / "b" / "CURRENT").exists()
