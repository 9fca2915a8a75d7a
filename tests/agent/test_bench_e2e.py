"""``reverie bench e2e``: its load processes over a real broker, its parsers, and a
``--quick`` smoke run of the whole bench (broker, daemon and load as real processes)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.bench.e2e.cli import (
    TARGET_IDLE_CPU_PCT,
    TARGET_INGEST_PCT,
    Plan,
    plan_from_args,
    targets,
)
from agent.bench.e2e.phases import drops
from agent.bench.e2e.procs import cpu_seconds, parse_metrics, status_kb, system_busy
from agent.errors import ConfigError
from agent.metrics import Registry
from agent.protocol import decode_frame

LOAD = [sys.executable, "-m", "agent.bench.e2e.load"]


# --- the load processes, against the session broker -----------------------------------


def test_paced_publisher_sends_whole_rounds_of_decodable_frames(broker_url, mqtt_collector,
                                                                 unique_device, tmp_path):
    prefix = f"e2e/{unique_device}"
    probe = mqtt_collector(f"{prefix}/+/frames", qos=0)
    times = tmp_path / "times.npy"
    out = subprocess.run([*LOAD, "pub", "--url", broker_url, "--prefix", prefix,
                          "--devices", "a,b", "--samples", "32", "--channels", "6",
                          "--rate", "400", "--seconds", "0.1", "--round", "8", "--seq0", "5",
                          "--times", str(times)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("start ")
    summary = json.loads(lines[-1])
    sent = summary["sent"]
    assert sent == 40                              # 400/s * 0.1 s, whole rounds of 8
    assert summary["seq_next"] == 5 + sent // 2
    t = np.load(times)
    assert len(t) == sent and np.all(np.diff(t) >= 0)
    assert summary["t_first"] == t[0] and summary["t_last"] == t[-1]
    msgs = probe.wait_for_count(sent, timeout_s=10)
    by_device: dict[str, list[int]] = {"a": [], "b": []}
    for m in msgs:
        frame = decode_frame(m.payload)
        assert frame.values.shape == (32, 6)
        by_device[m.topic.split("/")[-2]].append(frame.seq)
    # round robin: each device gets consecutive seqs from seq0, nothing else
    assert by_device == {"a": list(range(5, 25)), "b": list(range(5, 25))}


def test_flood_publisher_stops_on_a_round_boundary(broker_url, unique_device):
    out = subprocess.run([*LOAD, "pub", "--url", broker_url, "--prefix", f"e2e/{unique_device}",
                          "--devices", "x,y,z", "--samples", "128", "--channels", "6",
                          "--rate", "0", "--seconds", "0.2", "--round", "3"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["sent"] > 0 and summary["sent"] % 3 == 0
    assert summary["rate"] > 0


def test_prediction_subscriber_records_device_seq_and_receipt_time(broker_url, mqtt_collector,
                                                                   unique_device, tmp_path):
    prefix = f"e2e/{unique_device}"
    out = tmp_path / "pred.npz"
    sub = subprocess.Popen([*LOAD, "sub", "--url", broker_url, "--topic", f"{prefix}/+/predictions",
                            "--mode", "predictions", "--out", str(out), "--linger", "0.5"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert sub.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        probe = mqtt_collector()
        for seq in range(3):
            body = {"device": "d1", "seq_last": seq, "latency_ms": 0.5}
            probe.publish(f"{prefix}/d1/predictions", json.dumps(body), qos=1)
        probe.publish(f"{prefix}/d1/predictions", b"not json", qos=1)   # ignored
        sub.stdin.close()
        assert sub.stdout.readline().strip() == "done"
        assert sub.wait(10) == 0
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    rec = np.load(out)
    assert rec["device"].tolist() == ["d1"] * 3
    assert rec["seq_last"].tolist() == [0, 1, 2]
    assert np.all(rec["t"] >= t0)                  # a monotonic time, comparable with ours
    assert rec["latency_ms"].tolist() == [0.5] * 3


# --- parsers and bookkeeping ----------------------------------------------------------

_names = st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_names, st.dictionaries(_names, st.integers(0, 10**9), max_size=4),
                       min_size=1, max_size=5))
def test_parse_metrics_reads_back_what_the_registry_renders(counters):
    reg = Registry()
    expected = {}
    for name, by_label in counters.items():
        c = reg.counter(f"m_{name}_total", "x", ["reason"])
        for label, n in by_label.items():
            c.inc(n, reason=label)
            expected[f'm_{name}_total{{reason="{label}"}}'] = float(n)
    parsed = parse_metrics(reg.render().decode())
    assert {k: v for k, v in parsed.items() if k in expected} == expected
    assert set(parsed) == set(expected)


def test_drops_by_reason_outbox_and_not_received():
    m0 = {'reverie_dropped_total{reason="queue_full"}': 5.0,
          'reverie_messages_received_total{kind="frames"}': 100.0}
    m1 = {'reverie_dropped_total{reason="queue_full"}': 12.0,
          'reverie_dropped_total{reason="bad_json"}': 0.0,
          'reverie_outbox_dropped_total': 3.0,
          'reverie_messages_received_total{kind="frames"}': 150.0}
    assert drops(m0, m1, sent=60) == {"queue_full": 7, "outbox_full": 3, "not_received": 10}
    assert drops(m0, m0, sent=0) == {}


def test_proc_readings_of_this_process():
    busy0 = system_busy()
    t = time.process_time()
    while time.process_time() - t < 0.05:      # burn a little CPU
        pass
    assert cpu_seconds(os.getpid()) > 0
    assert status_kb(os.getpid(), "VmRSS") > 1000
    busy1 = system_busy()
    assert busy1[0] >= busy0[0] and busy1[1] > busy0[1]


def _args(**kw):
    base = dict(quick=False, seconds=None, idle_seconds=None, devices=None, rates=None)
    return argparse.Namespace(**{**base, **kw})


def test_plan_from_args_and_bad_values_named():
    assert plan_from_args(_args()) == Plan()
    assert plan_from_args(_args(quick=True, rates="10,20")).rates == (10.0, 20.0)
    for kw, needle in ((dict(rates="100,fast"), "'100,fast'"), (dict(seconds=0.0), "seconds=0.0"),
                       (dict(rates="0"), "rates=(0.0,)"), (dict(devices=0), "devices=0"),
                       (dict(idle_seconds=-1.0), "idle_s=-1.0")):
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            plan_from_args(_args(**kw))


def test_targets_say_met_not_met_or_not_measured():
    result = {"ingest": [{"frame_samples": 128, "pct_of_ceiling": 40.0}],
              "latency": [{"devices": 1, "target_rate": 2000.0, "p99_ms": 3.0, "pacing_ok": True},
                          {"devices": 100, "target_rate": 500.0, "p99_ms": 1.0,
                           "pacing_ok": True}],
              "idle": {"cpu_pct": 0.4}}
    assert [t["met"] for t in targets(result)] == [False, True, None, True]


# --- the whole bench, --quick ---------------------------------------------------------


@pytest.mark.slow
def test_quick_run_writes_a_complete_json(sim_bundle, tmp_path):
    out = tmp_path / "e2e.json"
    run = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "e2e", "--quick",
                          "--bundle", str(sim_bundle), "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "raw ceiling" in run.stdout and "idle CPU" in run.stdout
    r = json.loads(out.read_text())
    plan = Plan.quick()
    assert r["bench"] == "e2e" and r["window"] == [6, 128]
    (ceiling,) = r["raw_ceiling"]
    assert ceiling["frame_samples"] == 128
    assert ceiling["sent"] > 0 and ceiling["received_per_s"] > 0
    (ingest,) = r["ingest"]
    assert ingest["frames_per_s"] > 0 and ingest["windows_per_s"] > 0
    assert ingest["pct_of_ceiling"] > 0
    assert ingest["frames"] > 0 and isinstance(ingest["dropped"], dict)
    assert [(row["devices"], row["target_rate"]) for row in r["latency"]] == \
        [(n, rate) for n in (1, plan.gateway_devices) for rate in plan.rates]
    for row in r["latency"]:
        assert row["sent"] > 0 and row["received"] > 0 and row["achieved_rate"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["daemon_p50_ms"] > 0
    idle = r["idle"]
    assert idle["seconds"] > 0
    assert idle["rss_mb"] > 0 and idle["after_load"]["rss_mb"] > 0
    assert r["gateway_after_load"]["rss_mb"] > 0
    # each verdict follows its rule from this run's figures
    first, *_, last = r["targets"]
    assert first["met"] is (ingest["pct_of_ceiling"] >= TARGET_INGEST_PCT)
    assert last["met"] is (idle["cpu_pct"] <= TARGET_IDLE_CPU_PCT)
