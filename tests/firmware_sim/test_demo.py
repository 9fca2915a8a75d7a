"""`reverie demo`: the dashboard and the report from synthetic data, and the short demo end to
end on the session broker (training its own base model, the agent as a subprocess)."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cli import main
from firmware_sim.dashboard import Dashboard, NewClass, Snapshot, log_line, render
from firmware_sim.demo import bundle_key
from firmware_sim.report import Scoreboard, rolling_accuracy, summary_lines, write_report
from firmware_sim.scenario import load_scenario

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _snapshot(**kw) -> Snapshot:
    base = dict(scenario="wearable-imu", elapsed_wall_s=42.0, stream_s=126.0, duration_s=180.0,
                phase="falls", predictions=480, devices_seen=10, devices=10, accuracy=0.9,
                rolling=0.85, rolling_n=70,
                recall={"idle": (95, 100), "walk": (40, 50), "stairs": (30, 40)},
                base_classes=("idle", "walk", "run"),
                new_classes={"stairs": NewClass(60.0, 77.0, (2, 20), (18, 20)),
                             "fall": NewClass(120.0, None)},
                memory=(150, 10000), sleeps=((90.0, "rolled_back"),), sleeping=True,
                windows_per_s=11.5, labels_sent=13, labels_learned=12, errors=1, novelty=3,
                recent=("120.0 s  new class appears: 'fall' on sim-004",))
    return Snapshot(**{**base, **kw})


def test_render_shows_every_part_of_the_state():
    text = render(_snapshot())
    assert "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == ("reverie demo | wearable-imu | stream 126/180 s (70%) | phase: falls "
                        "| wall 42 s")
    assert "last 70" in lines[1] and "85.0%" in lines[1] and "90.0%" in lines[1]
    assert "windows 480 from 10/10 devices" in lines[1]
    idle = next(line for line in lines if line.strip().startswith("idle"))
    assert "base" in idle and "95.0%" in idle and "#" * 19 in idle and "95/100" in idle
    stairs = next(line for line in lines if line.strip().startswith("stairs"))
    assert "NEW" in stairs and "arrived 60 s, labelled 77 s: 10.0% before -> 90.0% after" \
        in stairs
    assert any("fall" in line and "arrives at 120 s" in line for line in lines)
    assert "memory    150/10000 episodes (1.5%)" in lines
    assert "sleeps    1 done (0 accepted, 1 rolled back), sleeping now" in lines
    assert any("13 sent, 12 learned" in line and "11.5 windows/s" in line for line in lines)
    assert lines[-1].strip().startswith("120.0 s  new class appears")


def test_render_empty_state_and_colour():
    s = _snapshot(predictions=0, accuracy=None, rolling=None, recall={}, memory=None,
                  new_classes={}, sleeps=(), sleeping=False, recent=())
    text = render(s)
    assert "   -  " in text and "memory    -" in text and "recent" not in text
    coloured = render(_snapshot(), color=True)
    assert "\x1b[32m" in coloured and "\x1b[0m" in coloured  # green for 95 %
    assert coloured.count("\n") == render(_snapshot()).count("\n")  # same rows


def test_log_line_is_one_line_with_the_headline_numbers():
    line = log_line(_snapshot())
    assert "\n" not in line and line.startswith("[demo] stream 126/180 s (falls)")
    assert "acc 90.0% (last 70: 85.0%)" in line and "memory 150/10000" in line
    assert "stairs: 90.0% after label" in line and "fall:" not in line


def test_dashboard_redraws_in_place():
    out = io.StringIO()
    dash = Dashboard(_snapshot, out=out, live=True)
    dash.draw()
    dash.draw()
    text = out.getvalue()
    n = render(_snapshot()).count("\n") + 1
    assert text.count(f"\x1b[{n}F") == 1  # the second draw moved up over the first
    assert text.endswith("\x1b[J")


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 20))
def test_rolling_accuracy_matches_the_obvious_loop(correct, n):
    got = rolling_accuracy(np.array(correct, bool), n)
    want = [np.mean(correct[max(0, i + 1 - n):i + 1]) for i in range(len(correct))]
    np.testing.assert_allclose(got, want)


FRAME_S = 1.0
TIMELINE = [{"type": "phase", "t_s": 0.0, "name": "base", "index": 0},
            {"type": "phase", "t_s": 10.0, "name": "new", "index": 1},
            {"type": "new_class", "t_s": 10.0, "class": "shake", "device": "d0"},
            {"type": "sleep", "t_s": 15.0}]


def _truth(device: str, seq: int) -> str:
    if device != "d0" or not 0 <= seq < 20:
        raise ValueError(f"no truth for {device} {seq}")
    return "idle" if seq < 10 else "shake"


def _board() -> Scoreboard:
    board = Scoreboard(scenario="synthetic", classes=("idle", "walk", "shake"),
                       base_classes=("idle", "walk"), timeline=TIMELINE, frame_s=FRAME_S,
                       duration_s=20.0, devices=1, truth=_truth, rolling_n=4)
    for e in TIMELINE:
        board.on_timeline(e)
    for s in range(0, 12, 2):  # windows of 2 frames; the base model says idle throughout
        board.on_prediction({"device": "d0", "seq_first": s, "seq_last": s + 1, "label": "idle"})
    board.on_label_sent("d0", {"label": "shake"})
    board.on_event({"type": "label", "reason": "learned", "label": "shake", "new_class": True})
    for s in range(12, 20, 2):
        board.on_prediction({"device": "d0", "seq_first": s, "seq_last": s + 1,
                             "label": "shake" if s != 14 else "idle"})
    board.on_event({"type": "sleep", "reason": "started", "trigger": "command"})
    board.on_event({"type": "sleep", "reason": "accepted", "detail": "ok",
                    "report": {"duration_s": 1.5, "adapter_version": 1}})
    board.on_event({"type": "error", "reason": "unknown_window", "topic": "p/d0/labels"})
    board.set_memory(70, 10000)
    return board


def test_scoreboard_scores_against_truth_and_splits_at_the_first_label():
    board = _board()
    assert not board.on_prediction({"device": "other", "seq_first": 0, "seq_last": 1,
                                    "label": "idle"})
    assert not board.on_prediction({"device": "d0", "seq_first": 19, "seq_last": 25,
                                    "label": "idle"})  # beyond the truth: ignored
    s = board.summary()
    assert s["windows"] == 10 and s["per_device"] == {"d0": 10}
    a = s["accuracy"]
    assert a["overall"] == 0.8 and a["base"] == 1.0 and a["final_rolling"] == 0.75
    shake = a["new_classes"]["shake"]
    assert shake["arrival_s"] == 10.0 and shake["first_label_learned_s"] == 10.0
    assert (shake["recall_before_label"], shake["windows_before_label"]) == (0.0, 1)
    assert (shake["recall_after_label"], shake["windows_after_label"]) == (0.75, 4)
    assert s["per_class_recall"]["idle"]["recall"] == 1.0
    assert s["sleeps"]["accepted"] == 1 and s["sleeps"]["commanded_at_s"] == [15.0]
    assert s["labels"] == {"sent": 1, "learned": 1, "failed": 1, "classes_learned": ["shake"]}
    assert s["memory"] == {"episodes": 70, "capacity": 10000}
    snap = board.snapshot()
    assert snap.predictions == 10 and snap.phase == "new" and snap.rolling == 0.75
    assert snap.new_classes["shake"].after == (3, 4) and snap.sleeps == ((18.0, "accepted"),)
    assert "learned a new class from a label: 'shake'" in " ".join(snap.recent)
    render(snap), log_line(snap)  # a real snapshot renders


def test_report_png_and_json(tmp_path):
    board = _board()
    png, js = write_report(board, tmp_path / "out", "synthetic",
                           extra={"durations_s": {"total": 3.0, "training": 1.0,
                                                  "stream_wall": 2.0},
                                  "throughput": {"windows_per_s": 5.0}})
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    summary = json.loads(js.read_text())
    assert summary["scenario"] == "synthetic" and summary["accuracy"]["overall"] == 0.8
    assert summary["paths"] == {"png": str(png), "json": str(js)}
    lines = summary_lines(summary)
    assert "accuracy 80.0% overall" in lines[0]
    assert any("'shake'" in line and "0.0% before" in line and "75.0% after" in line
               for line in lines)


def test_report_of_an_empty_run(tmp_path):
    board = Scoreboard(scenario="empty", classes=("a", "b"), base_classes=("a",), timeline=[],
                       frame_s=1.0, duration_s=10.0, devices=1, truth=_truth)
    png, js = write_report(board, tmp_path, "empty")
    s = json.loads(js.read_text())
    assert png.exists() and s["windows"] == 0 and s["accuracy"]["overall"] is None


def test_bundle_key_follows_what_the_model_depends_on():
    sc = load_scenario("wearable-imu")
    assert bundle_key(sc) == bundle_key(load_scenario("smoke"))  # same model, classes, window
    assert bundle_key(replace(sc, window_samples=64)) != bundle_key(sc)
    assert bundle_key(replace(sc, base_classes=("idle", "walk"))) != bundle_key(sc)


@pytest.mark.parametrize("argv, needle", [
    (["--scenario", "no-such-scenario"], "no-such-scenario"),
    (["--short", "--speed", "0"], "--speed: 0"),
    (["--short", "--devices", "0"], "--devices: 0"),
])
def test_bad_input_is_refused_before_anything_starts(tmp_path, capsys, argv, needle):
    assert main(["demo", "--out", str(tmp_path), *argv]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_demo_short_end_to_end(tmp_path, broker_url, broker, capsys):
    rc = main(["demo", "--short", "--broker", broker_url, "--out", str(tmp_path), "--quiet",
               "--protocol", broker.protocols[-1]])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (tmp_path / "smoke.png").read_bytes()[:8] == PNG_MAGIC
    s = json.loads((tmp_path / "smoke.json").read_text())
    assert s["scenario"] == "smoke" and s["devices"] == 2
    assert set(s["per_device"]) == {"sim-000", "sim-001"} and min(s["per_device"].values()) >= 1
    a = s["accuracy"]
    for key in ("overall", "final_rolling", "base"):
        assert 0.0 <= a[key] <= 1.0
    assert a["base"] >= 0.7, s  # the base model knows the base classes
    assert list(a["new_classes"]) == ["shake"] and 9.5 <= a["new_classes"]["shake"]["arrival_s"] < 11.0
    assert s["labels"]["sent"] >= 1 and s["error_events"] == 0
    assert s["sleeps"]["commanded_at_s"] == [30.0] and s["sleeps"]["started"] >= 1
    assert "report: " in out and "[demo] stream" in out  # --quiet: log lines, not a screen
