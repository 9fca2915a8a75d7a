"""``reverie bench fuzz``: a small campaign through a private mosquitto, counted exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agent.bench.fuzz import run_campaign


def test_small_campaign_counts_every_rejection(sim_bundle, tmp_path):
    r = run_campaign(sim_bundle, 300, seed=1, workdir=tmp_path)
    assert r["checks"] == {k: True for k in r["checks"]}, r
    assert r["alive"] and r["exit_code"] == 0 and r["passed"]
    assert r["drops_counted"] == r["drops_expected"] >= r["malformed"] > 250
    rows = {row["reason"]: row for row in r["rejections"]}
    assert all(row["expected"] == row["counted"] for row in rows.values())
    assert {"bad_json", "bad_binary", "non_finite"} <= set(rows)
    assert r["predictions"] == r["valid_frames"] > 0
    assert r["state"]["finite"] and r["state"]["arrays_checked"] > 0
    # the one commanded sleep trains on the campaign's valid labels and passes its gate
    assert r["sleeps"] == {"accepted": 1, "rolled_back": 0, "preempted": 0, "error": 0}


def test_cli_rejects_a_bad_count_and_writes_json(sim_bundle, tmp_path):
    bad = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "fuzz", "--payloads",
                          "0", "--bundle", str(sim_bundle)], capture_output=True, text=True)
    assert bad.returncode != 0 and "--payloads 0" in bad.stderr


@pytest.mark.slow
def test_cli_campaign_writes_json(sim_bundle, tmp_path):
    out = tmp_path / "fuzz.json"
    run = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "fuzz", "--payloads",
                          "2000", "--bundle", str(sim_bundle), "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASS" in run.stdout and json.loads(out.read_text())["passed"]
