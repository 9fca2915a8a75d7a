"""Impairments: sensor drift and faults, the network shaper and the label oracle."""

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ProtocolError
from agent.protocol import decode_frame, encode_frame_binary, encode_frame_json
from firmware_sim.impair import DeviceImpairment, NetworkShaper, Oracle, fault_devices
from firmware_sim.scenario import (
    Drift,
    LabelOracle,
    Network,
    SensorFault,
    load_scenario,
    scenario_from_dict,
)

RATE = 50.0
C = 6


def scenario(devices=1, drift=None, faults=()):
    s = scenario_from_dict({
        "name": "t", "sensor": {"model": "imu"}, "devices": {"count": devices},
        "classes": {"base": ["idle"]},
        "phases": [{"name": "a", "duration_s": 7200, "mix": {"idle": 1}}]})
    return replace(s, drift=drift or Drift(), faults=tuple(faults))


def signal(n, seed=0):
    return np.random.default_rng(seed).normal(0, 1, (n, C)).astype(np.float32)


def impair_stream(imp, x, chunks, t0=0.0):
    out, i = [], 0
    for n in chunks:
        out.append(imp.apply(x[i:i + n], t0 + i / RATE))
        i += n
    return np.concatenate(out)


# --------------------------------------------------------------------------- DeviceImpairment

def test_no_impairment_is_the_identity():
    x = signal(100)
    out = DeviceImpairment(scenario(), 0, C, RATE, seed=1).apply(x, 0.0)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x)


def test_apply_refuses_the_wrong_channel_count():
    with pytest.raises(ValueError, match=r"\(n, 6\)"):
        DeviceImpairment(scenario(), 0, C, RATE, seed=1).apply(np.zeros((4, 3)), 0.0)


DRIFT = Drift(gain_per_h=0.5, offset_per_h=0.2, noise_growth_per_h=0.1, bias_walk=1e-3)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=8))
def test_drift_is_deterministic_and_chunking_does_not_change_it(chunks):
    x = signal(sum(chunks))
    whole = DeviceImpairment(scenario(drift=DRIFT), 0, C, RATE, seed=3).apply(x, 100.0)
    parts = impair_stream(DeviceImpairment(scenario(drift=DRIFT), 0, C, RATE, seed=3), x,
                          chunks, 100.0)
    np.testing.assert_allclose(parts, whole, rtol=1e-6, atol=1e-6)
    other = DeviceImpairment(scenario(drift=DRIFT), 0, C, RATE, seed=4).apply(x, 100.0)
    assert not np.allclose(other, whole)


def test_drift_grows_with_stream_time():
    ones = np.ones((500, C), np.float32)
    imp = DeviceImpairment(scenario(drift=Drift(gain_per_h=0.5)), 0, C, RATE, seed=0)
    early, late = imp.apply(ones, 0.0), imp.apply(ones, 3600.0)
    assert np.abs(early - 1).max() < 2e-3  # 10 s in
    assert (late >= 1.25 - 1e-3).all() and (late <= 1.5 + 1e-3).all()  # 50-100 % of the rate
    noisy = DeviceImpairment(scenario(drift=Drift(noise_growth_per_h=0.2)), 0, C, RATE, seed=0)
    zeros = np.zeros((2000, C), np.float32)  # 40 s
    assert noisy.apply(zeros, 0.0).std() < 0.01
    assert noisy.apply(zeros, 7200.0).std() == pytest.approx(0.4, rel=0.05)


def test_bias_walk_carries_over_between_calls():
    imp = DeviceImpairment(scenario(drift=Drift(bias_walk=0.01)), 0, C, RATE, seed=0)
    zeros = np.zeros((10_000, C), np.float32)
    a, b = imp.apply(zeros, 0.0), imp.apply(zeros[:1], 200.0)
    np.testing.assert_allclose(b[0], a[-1], atol=0.05)  # one more step of 0.01
    assert a[-1].std() > 0.2  # ~ 0.01 * sqrt(10000) = 1


def test_stuck_repeats_the_last_value_before_the_fault():
    fault = SensorFault("stuck", start_s=1.0, duration_s=1.0, channels=(0, 2))
    imp = DeviceImpairment(scenario(faults=[fault]), 0, C, RATE, seed=0)
    x = signal(200)
    out = impair_stream(imp, x, [30, 40, 30, 100])  # the fault starts inside the 2nd chunk
    during = slice(50, 100)
    np.testing.assert_array_equal(out[during][:, [0, 2]], np.tile(x[49, [0, 2]], (50, 1)))
    np.testing.assert_array_equal(out[during][:, [1, 3, 4, 5]], x[during][:, [1, 3, 4, 5]])
    np.testing.assert_array_equal(out[:50], x[:50])
    np.testing.assert_array_equal(out[100:], x[100:])


def test_saturation_clips_the_chosen_channels_during_the_fault():
    fault = SensorFault("saturation", start_s=1.0, duration_s=1.0, channels=(1,), level=0.5)
    imp = DeviceImpairment(scenario(faults=[fault]), 0, C, RATE, seed=0)
    x = signal(150) * 3
    out = imp.apply(x, 0.0)
    assert np.abs(out[50:100, 1]).max() == pytest.approx(0.5)
    np.testing.assert_array_equal(np.delete(out, 1, axis=1), np.delete(x, 1, axis=1))
    np.testing.assert_array_equal(out[100:], x[100:])


def test_dropout_silences_the_device_and_leaves_the_values():
    fault = SensorFault("dropout", start_s=10.0, duration_s=5.0)
    imp = DeviceImpairment(scenario(faults=[fault]), 0, C, RATE, seed=0)
    assert [imp.silent(t) for t in (9.99, 10.0, 14.99, 15.0)] == [False, True, True, False]
    x = signal(50)
    np.testing.assert_array_equal(imp.apply(x, 10.0), x)


def test_faults_hit_a_seeded_share_of_the_fleet():
    fault = SensorFault("dropout", start_s=0.0, duration_s=5.0, devices=0.25)
    s = scenario(devices=40, faults=[fault])
    hit = fault_devices(s, 0)
    assert len(hit) == 10 and hit == fault_devices(s, 0)
    silent = {i for i in range(40) if DeviceImpairment(s, i, C, RATE, seed=i).silent(1.0)}
    assert silent == hit
    assert fault_devices(replace(s, seed=1), 0) != hit
    tiny = replace(s, faults=(replace(fault, devices=0.001),))
    assert len(fault_devices(tiny, 0)) == 1  # at least one device


# --------------------------------------------------------------------------- NetworkShaper

def frames(n, encode=encode_frame_binary):
    return [encode(i, 1000.0 + i, np.full((4, 3), i, np.float32)) for i in range(n)]


def run_shaper(net, payloads, seed=0, t_of=lambda i: float(i)):
    shaper = NetworkShaper(net, seed)
    out = [p for i, p in enumerate(payloads) for p in shaper.shape(i, p, t_of(i))]
    return shaper, out + shaper.flush()


def test_a_clean_network_passes_everything_in_order():
    payloads = frames(100)
    shaper, out = run_shaper(Network(), payloads)
    assert out == payloads and shaper.stats.sent == 100


def test_the_shaper_is_deterministic_under_the_seed():
    net = Network(burst_prob=0.05, burst_len=3, duplicate_prob=0.1, reorder_prob=0.1,
                  malformed_prob=0.05)
    payloads = frames(500)
    assert run_shaper(net, payloads, 7)[1] == run_shaper(net, payloads, 7)[1]
    assert run_shaper(net, payloads, 7)[1] != run_shaper(net, payloads, 8)[1]


def test_duplicate_and_loss_rates_match_the_probabilities():
    n = 20_000
    payloads = frames(n)
    shaper, out = run_shaper(Network(duplicate_prob=0.05), payloads)
    assert shaper.stats.duplicated == pytest.approx(0.05 * n, abs=5 * (0.05 * n) ** 0.5)
    assert len(out) == n + shaper.stats.duplicated
    assert set(out) == set(payloads)
    shaper, out = run_shaper(Network(burst_prob=0.01, burst_len=5), payloads)
    lost = shaper.stats.lost_burst
    # a burst starts with p per frame not already in one: share lost = 5p / (1 + 4p)
    assert lost / n == pytest.approx(0.05 / 1.04, rel=0.15)
    assert len(out) == n - lost


@settings(max_examples=40, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.integers(1, 6), st.integers(0, 2**32))
def test_reordering_and_duplicates_lose_nothing(reorder_prob, dup_prob, depth, seed):
    payloads = frames(60)
    net = Network(reorder_prob=reorder_prob, reorder_depth=depth, duplicate_prob=dup_prob)
    shaper, out = run_shaper(net, payloads, seed)
    assert set(out) == set(payloads) and shaper.held == 0
    assert len(out) == 60 + shaper.stats.duplicated


def test_a_held_frame_comes_after_reorder_depth_later_frames():
    payloads = frames(2000)
    shaper = NetworkShaper(Network(reorder_prob=0.1, reorder_depth=3), 0)
    sent_at = {}  # seq -> the call that published it
    for i, p in enumerate(payloads):
        for q in shaper.shape(i, p, float(i)):
            sent_at[decode_frame(q).seq] = i
    for q in shaper.flush():
        sent_at[decode_frame(q).seq] = len(payloads)
    late = {seq: call for seq, call in sent_at.items() if call != seq}
    assert len(late) == shaper.stats.reordered > 100
    assert all(call == min(seq + 3, len(payloads)) for seq, call in late.items())


def test_disconnects_lose_frames_and_keep_held_ones():
    net = Network(disconnects=((10.0, 5.0),), reorder_prob=0.0)
    shaper = NetworkShaper(net, 0)
    assert [shaper.connected(t) for t in (9.9, 10.0, 14.9, 15.0)] == [True, False, False, True]
    payloads = frames(30)
    out = [p for i, p in enumerate(payloads) for p in shaper.shape(i, p, float(i))]
    assert out == payloads[:10] + payloads[15:]
    assert shaper.stats.lost_disconnected == 5


def test_malformed_payloads_are_rejected_by_the_agent_decoder():
    for encode in (encode_frame_binary, encode_frame_json):
        payloads = frames(400, encode)
        shaper, out = run_shaper(Network(malformed_prob=0.5), payloads, seed=3)
        bad = [p for p in out if p not in payloads]
        assert len(bad) == shaper.stats.malformed > 100
        reasons = Counter()
        for p in bad:
            try:
                frame = decode_frame(p)
            except ProtocolError as exc:
                reasons[exc.reason] += 1
            else:
                assert frame.n_channels != 3  # the wrong channel count
                reasons["wrong_channels"] += 1
        assert {"wrong_channels", "non_finite"} <= set(reasons) and len(reasons) >= 3, reasons


# --------------------------------------------------------------------------- Oracle

CLASSES = ("idle", "walk", "run")


def label_all(spec, seed=0, n=2000, length=10.0):
    oracle = Oracle(spec, seed)
    out = [oracle.segment("sim-000", CLASSES[i % 3], i * length, (i + 1) * length, CLASSES)
           for i in range(n)]
    return oracle, out


def test_oracle_labels_a_fraction_after_the_delay():
    spec = LabelOracle(fraction=0.3, delay_s=10, delay_jitter_s=4, noise=0.0)
    oracle, out = label_all(spec)
    got = [(i, r) for i, r in enumerate(out) if r is not None]
    assert len(got) == pytest.approx(600, abs=5 * 600 ** 0.5)
    for i, r in got:
        p = r["payload"]
        assert p["label"] == CLASSES[i % 3]
        assert (p["from_ts"], p["to_ts"]) == (i * 10.0, (i + 1) * 10.0)
        assert 6 <= r["due_s"] - p["to_ts"] <= 14
    delays = [r["due_s"] - r["payload"]["to_ts"] for _, r in got]
    assert min(delays) < 7 and max(delays) > 13
    ids = [r["payload"]["id"] for _, r in got]
    assert len(set(ids)) == len(ids) and all(i.startswith("sim-000-") for i in ids)
    assert oracle.labelled == len(got)


def test_oracle_is_deterministic_and_the_seed_changes_the_ids():
    spec = LabelOracle(fraction=0.5, noise=0.2, delay_jitter_s=1)
    assert label_all(spec, 5)[1] == label_all(spec, 5)[1]
    a = {r["payload"]["id"] for r in label_all(spec, 5)[1] if r}
    b = {r["payload"]["id"] for r in label_all(spec, 6)[1] if r}
    assert not a & b


def test_label_noise_flips_to_another_class():
    oracle, out = label_all(LabelOracle(fraction=1.0, noise=0.1, delay_s=0))
    wrong = [(i, r["payload"]["label"]) for i, r in enumerate(out) if
             r["payload"]["label"] != CLASSES[i % 3]]
    assert len(wrong) == oracle.flipped == pytest.approx(200, abs=5 * 200 ** 0.5)
    assert all(label in CLASSES for _, label in wrong)
    assert {label for _, label in wrong} == set(CLASSES)
    one = Oracle(LabelOracle(fraction=1.0, noise=1.0), 0)
    assert one.segment("d", "idle", 0, 10, ["idle"])["payload"]["label"] == "idle"


def test_short_segments_and_fraction_zero_are_never_labelled():
    oracle, out = label_all(LabelOracle(fraction=1.0, min_segment_s=5), length=4.9)
    assert out == [None] * 2000 and oracle.too_short == 2000
    assert label_all(LabelOracle(fraction=0.0))[1] == [None] * 2000


def test_shipped_scenarios_drive_the_impairments():
    s = load_scenario("factory-vibration")
    imp = DeviceImpairment(s, 3, 3, 1000.0, seed=3)
    out = imp.apply(np.zeros((640, 3), np.float32), 100.0)
    assert out.shape == (640, 3) and np.isfinite(out).all()
    shaper = NetworkShaper(s.network, 0)
    assert not shaper.connected(71.0) and shaper.connected(80.0)
    oracle = Oracle(s.labels, 0)
    assert oracle.segment("sim-003", "healthy", 0, 1, s.classes) is None  # too short
