"""Scenario loading: the shipped files, the schema's refusals, and TOML round trips."""

import copy
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError
from firmware_sim._schema import dumps_toml
from firmware_sim.scenario import (
    FAULT_KINDS,
    Scenario,
    list_scenarios,
    load_scenario,
    scenario_from_dict,
    scenario_to_dict,
)
from firmware_sim.sensors import get_model

SHIPPED = ("smoke", "factory-vibration", "wearable-imu", "building-environment")
IMU = get_model("imu")


def minimal() -> dict:
    return {
        "name": "t", "sensor": {"model": "imu"}, "classes": {"base": ["idle", "walk"]},
        "phases": [{"name": "a", "duration_s": 20, "mix": {"idle": 1, "walk": 1}},
                   {"name": "b", "duration_s": 20, "mix": {"walk": 1, "run": 3}}],
    }


# --------------------------------------------------------------------------- shipped files

def test_the_shipped_scenarios_are_listed():
    assert set(SHIPPED) <= set(list_scenarios())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_scenario_loads_and_round_trips(name):
    s = load_scenario(name)
    assert s.name == name and s.description
    model = get_model(s.model, **s.model_params)
    assert set(s.classes) <= set(model.classes)
    assert s.new_classes(), "every shipped scenario has a class appearing mid-run"
    assert all(0 < t < s.duration_s for t in s.new_classes().values())
    assert all(math.isclose(sum(p.mix.values()), 1.0) for p in s.phases)
    assert scenario_from_dict(scenario_to_dict(s)) == s


def test_smoke_is_short_with_a_new_class_and_a_sleep():
    s = load_scenario("smoke")
    assert 20 <= s.duration_s <= 40
    assert s.new_classes() == {"shake": 10.0} and s.sleep_at_s


def test_factory_vibration_has_what_the_issue_asks_for():
    s = load_scenario("factory-vibration")
    assert s.model == "vibration"
    assert s.base_classes == ("healthy", "imbalance", "misalignment")
    assert "outer_race" in s.new_classes()
    assert s.drift.gain_per_h and s.labels.fraction < 0.5 and s.labels.delay_s > 0
    assert len(s.network.disconnects) == 1


def test_load_by_path_and_file_errors(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(dumps_toml(minimal()))
    assert load_scenario(path) == scenario_from_dict(minimal())
    assert load_scenario(str(path)).name == "t"
    with pytest.raises(ConfigError, match="no such file"):
        load_scenario(tmp_path / "absent.toml")
    path.write_text("name = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_scenario(path)
    with pytest.raises(ConfigError, match=r"unknown scenario 'smok' \(did you mean smoke\?\)"):
        load_scenario("smok")


def test_defaults_and_derived_values():
    s = scenario_from_dict(minimal())
    assert (s.seed, s.devices, s.frame_samples, s.window_samples) == (0, 1, 16, 128)
    assert s.phases[1].mix == {"walk": 0.25, "run": 0.75}
    assert s.phases[0].segment_s == (5.0, 20.0)
    assert s.duration_s == 40 and s.phase_starts_s == (0.0, 20.0)
    assert s.classes == ("idle", "walk", "run") and s.new_classes() == {"run": 20.0}
    assert [s.phase_at(t).name for t in (0, 19.9, 20, 39, 45)] == ["a", "a", "b", "b", "b"]
    assert s.labels.fraction == 0.1 and s.network.reorder_depth == 2 and s.faults == ()


def test_zero_weights_are_dropped_and_sleeps_sorted():
    d = minimal()
    d["phases"][1]["mix"]["fall"] = 0
    d["sleep"] = {"at_s": [30, 10]}
    s = scenario_from_dict(d)
    assert "fall" not in s.classes and s.sleep_at_s == (10.0, 30.0)


# --------------------------------------------------------------------------- refusals

def _set(path: str, value):
    """A mutation setting ``a.b.0.c`` (list indices as numbers) to `value`."""
    def apply(d):
        *parents, last = path.split(".")
        node = d
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[int(last) if isinstance(node, list) else last] = value
    return apply


def _del(path: str):
    def apply(d):
        *parents, last = path.split(".")
        node = d
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        del node[last]
    return apply


BROKEN = [  # (mutation, the key the error names, a word of the reason)
    (_set("colour", 1), "colour", "unknown key"),
    (_set("labels.fractoin", 0.1), "labels.fractoin", "did you mean fraction"),
    (_set("drift.seed", 1), "drift.seed", "top-level key"),
    (_set("seed", -1), "seed", ">= 0"),
    (_set("seed", 1.5), "seed", "an integer"),
    (_set("name", ""), "name", "non-empty"),
    (_del("name"), "name", "missing"),
    (_set("sensor.model", "imuu"), "sensor.model", "did you mean imu"),
    (_set("sensor.params", {"rpm": 1}), "sensor.params", "rpm"),
    (_set("devices.count", 0), "devices.count", "1.."),
    (_set("devices.count", True), "devices.count", "an integer"),
    (_set("devices.frame_samples", 5000), "devices.frame_samples", "1..4096"),
    (_set("devices.frame_samples", 200), "devices.frame_samples", "window_samples"),
    (_set("devices.window_samples", 5000), "devices.window_samples", "longer than|no longer"),
    (_set("classes.base", []), "classes.base", "non-empty"),
    (_set("classes.base", ["idle", "idle"]), "classes.base", "repeated"),
    (_set("classes.base", ["idle", "jog"]), "classes.base[1]", "class of model"),
    (_set("classes.base", ["idle", "run"]), "classes.base", "first phase"),
    (_set("classes.new", ["run", "fall"]), "classes.new", "never"),
    (_set("classes.new", []), "classes.new", "missing"),
    (_set("classes.new", ["idle"]), "classes.new", "not in classes.base"),
    (_set("phases", []), "phases", "at least one"),
    (_set("phases", {"name": "x"}), "phases", "array of tables"),
    (_set("phases.1.name", "a"), "phases[1].name", "unique"),
    (_set("phases.0.duration_s", 0), "phases[0].duration_s", "> 0"),
    (_set("phases.0.duration_s", "10"), "phases[0].duration_s", "number"),
    (_set("phases.0.duration_s", math.inf), "phases[0].duration_s", "finite"),
    (_del("phases.0.mix"), "phases[0].mix", "missing"),
    (_set("phases.1.mix", {"walk": 0, "run": 0}), "phases[1].mix", "more than 0"),
    (_set("phases.1.mix", {"walk": -1, "run": 3}), "phases[1].mix.walk", ">= 0"),
    (_set("phases.1.mix", {"wlak": 1}), "phases[1].mix.wlak", "did you mean walk"),
    (_set("phases.0.segment_s", [5, 1]), "phases[0].segment_s", "min <= max"),
    (_set("phases.0.segment_s", [0, 1]), "phases[0].segment_s", "0 < min"),
    (_set("phases.0.segment_s", [1]), "phases[0].segment_s", "min, max"),
    (_set("phases.0.speed", 1), "phases[0].speed", "unknown key"),
    (_set("drift.gain_per_h", -1000), "drift.gain_per_h", "gain > 0"),
    (_set("drift.bias_walk", -1), "drift.bias_walk", ">= 0"),
    (_set("drift.noise_growth_per_h", -1), "drift.noise_growth_per_h", ">= 0"),
    (_set("faults", [{"kind": "melted", "start_s": 1, "duration_s": 1}]), "faults[0].kind",
     "stuck"),
    (_set("faults", [{"kind": "stuck", "start_s": 40, "duration_s": 1}]), "faults[0].start_s",
     "inside the scenario"),
    (_set("faults", [{"kind": "stuck", "start_s": 30, "duration_s": 20}]),
     "faults[0].duration_s", "ends by the scenario's end"),
    (_set("faults", [{"kind": "stuck", "start_s": 1, "duration_s": 0}]),
     "faults[0].duration_s", "> 0"),
    (_set("faults", [{"kind": "stuck", "start_s": 1, "duration_s": 1, "devices": 0}]),
     "faults[0].devices", "(0, 1]"),
    (_set("faults", [{"kind": "stuck", "start_s": 1, "duration_s": 1, "channels": [6]}]),
     "faults[0].channels[0]", "0..5"),
    (_set("faults", [{"kind": "stuck", "start_s": 1, "duration_s": 1, "channels": [1, 1]}]),
     "faults[0].channels", "distinct"),
    (_set("faults", [{"kind": "saturation", "start_s": 1, "duration_s": 1}]),
     "faults[0].level", "required"),
    (_set("faults", [{"kind": "dropout", "start_s": 1, "duration_s": 1, "level": 2}]),
     "faults[0].level", "only saturation"),
    (_set("labels.fraction", 1.5), "labels.fraction", "[0, 1]"),
    (_set("labels.noise", -0.1), "labels.noise", "[0, 1]"),
    (_set("labels.delay_s", -1), "labels.delay_s", ">= 0"),
    (_set("labels.delay_jitter_s", 10), "labels.delay_jitter_s", "precede"),
    (_set("labels.min_segment_s", 25), "labels.min_segment_s", "ever labelled"),
    (_set("network.disconnects", [[45, 1]]), "network.disconnects[0]", "0 <= start_s < 40"),
    (_set("network.disconnects", [[38, 5]]), "network.disconnects[0]", "scenario's end"),
    (_set("network.disconnects", [[10, 5], [12, 1]]), "network.disconnects[1]", "overlaps"),
    (_set("network.disconnects", [[10]]), "network.disconnects", "pairs"),
    (_set("network.duplicate_prob", 2), "network.duplicate_prob", "[0, 1]"),
    (_set("network.burst_len", 0), "network.burst_len", ">= 1"),
    (_set("network.reorder_depth", 1.5), "network.reorder_depth", "an integer"),
    (_set("sleep.at_s", [50]), "sleep.at_s[0]", "inside the scenario"),
    (_set("sleep.at_s", [0]), "sleep.at_s[0]", "inside the scenario"),
    (_set("sleep.at_s", [5, 5]), "sleep.at_s", "repeated"),
    (_set("sleep", 5), "sleep", "a table"),
]


@pytest.mark.parametrize(("mutate", "key", "reason"), BROKEN,
                         ids=[f"{k}:{r}" for _, k, r in BROKEN])
def test_a_broken_scenario_is_refused_naming_the_key(mutate, key, reason):
    d = minimal()
    mutate(d)
    with pytest.raises(ConfigError) as err:
        scenario_from_dict(d, "scenario file 'x.toml'")
    text = str(err.value)
    assert text.startswith("scenario file 'x.toml': ")
    assert f" {key}=" in text or f" {key} " in text or f"key {key}" in text, text
    assert any(r in text for r in reason.split("|")), text


def test_label_noise_needs_two_classes():
    d = {"name": "one", "sensor": {"model": "imu"}, "classes": {"base": ["idle"]},
         "phases": [{"name": "a", "duration_s": 10, "mix": {"idle": 1}}],
         "labels": {"noise": 0.1}}
    with pytest.raises(ConfigError, match="labels.noise"):
        scenario_from_dict(d)


# --------------------------------------------------------------------------- properties

@st.composite
def valid_dicts(draw) -> dict:
    classes = IMU.classes
    n_phases = draw(st.integers(1, 4))
    names = draw(st.lists(st.text(min_size=1, max_size=12).filter(str.strip),
                          min_size=n_phases, max_size=n_phases, unique=True))
    phases = []
    for name in names:
        mix = draw(st.dictionaries(st.sampled_from(classes), st.integers(1, 5) | st.floats(
            0.01, 10), min_size=1, max_size=4))
        lo = draw(st.floats(0.5, 10))
        phases.append({"name": name, "duration_s": draw(st.floats(2, 200)), "mix": mix,
                       "segment_s": [lo, lo + draw(st.floats(0, 10))]})
    duration = math.fsum(p["duration_s"] for p in phases)
    base = draw(st.lists(st.sampled_from(sorted(phases[0]["mix"])), min_size=1, unique=True))
    frame = draw(st.integers(1, 32))
    d = {"name": draw(st.text(min_size=1, max_size=20).filter(str.strip)),
         "description": draw(st.text(max_size=40)), "seed": draw(st.integers(0, 2**32)),
         "sensor": {"model": "imu", "params": draw(st.sampled_from([{}, {"rate_hz": 100.0}]))},
         "devices": {"count": draw(st.integers(1, 500)), "frame_samples": frame,
                     "window_samples": draw(st.integers(frame, frame + 40))},
         "classes": {"base": base}, "phases": phases}
    starts = sorted(draw(st.lists(st.floats(0, duration * 0.99), max_size=3)))
    d["faults"] = []
    for start in starts:
        kind = draw(st.sampled_from(FAULT_KINDS))
        fault = {"kind": kind, "start_s": start,
                 "duration_s": draw(st.floats(0.001, 0.99)) * (duration - start),
                 "devices": draw(st.floats(0.01, 1)),
                 "channels": draw(st.lists(st.integers(0, 5), unique=True, max_size=3))}
        if kind == "saturation":
            fault["level"] = draw(st.floats(0.1, 10))
        d["faults"].append(fault)
    d["drift"] = {"gain_per_h": draw(st.floats(-1, 1)), "offset_per_h": draw(st.floats(-1, 1)),
                  "noise_growth_per_h": draw(st.floats(0, 1)), "bias_walk": draw(st.floats(0, 1e-3))}
    delay = draw(st.floats(0, 30))
    n_classes = len({c for p in phases for c in p["mix"]})
    d["labels"] = {"fraction": draw(st.floats(0, 1)), "delay_s": delay,
                   "delay_jitter_s": draw(st.floats(0, 1)) * delay,
                   "noise": draw(st.floats(0, 1)) if n_classes > 1 else 0.0,
                   "min_segment_s": draw(st.floats(0, 0.5))}
    cuts = sorted(draw(st.lists(st.floats(0, duration), min_size=0, max_size=6, unique=True)))
    spans = [[a, b - a] for a, b in zip(cuts[::2], cuts[1::2], strict=False)
             if b > a and a + (b - a) <= b]
    d["network"] = {"disconnects": spans, "burst_prob": draw(st.floats(0, 1)),
                    "burst_len": draw(st.integers(1, 10)), "duplicate_prob": draw(st.floats(0, 1)),
                    "reorder_prob": draw(st.floats(0, 1)), "reorder_depth": draw(st.integers(1, 5)),
                    "malformed_prob": draw(st.floats(0, 1))}
    d["sleep"] = {"at_s": draw(st.lists(st.floats(0.001, duration * 0.999), unique=True,
                                        max_size=3))}
    return d


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_dicts())
def test_valid_dicts_round_trip_through_toml_text(tmp_path_factory, d):
    expected = scenario_from_dict(d)
    path = tmp_path_factory.mktemp("s") / "s.toml"
    path.write_text(dumps_toml(d), encoding="utf-8")
    loaded = load_scenario(path)
    assert loaded == expected
    assert isinstance(loaded, Scenario)
    again = scenario_from_dict(scenario_to_dict(loaded))  # normalised values are stable
    assert again == loaded


BREAKERS = [  # mutations of any valid dict that break one rule, and the key named
    (lambda d: d["labels"].update(fraction=1.01), "labels.fraction"),
    (lambda d: d["labels"].update(delay_jitter_s=d["labels"]["delay_s"] + 1),
     "labels.delay_jitter_s"),
    (lambda d: d["network"].update(reorder_prob=-0.5), "network.reorder_prob"),
    (lambda d: d["network"].update(typo=1), "network.typo"),
    (lambda d: d["devices"].update(count=0), "devices.count"),
    (lambda d: d["devices"].update(frame_samples=d["devices"]["window_samples"] + 1),
     "devices.frame_samples"),
    (lambda d: d["phases"][-1].update(duration_s=-1.0), "phases[{last}].duration_s"),
    (lambda d: d["phases"][0].update(mix={c: 0 for c in d["phases"][0]["mix"]}),
     "phases[0].mix"),
    (lambda d: d["phases"].append(dict(d["phases"][0])), "phases[{last}].name"),
    (lambda d: d["classes"]["base"].append("nope"), "classes.base[{nbase}]"),
    (lambda d: d["sleep"]["at_s"].append(1e9), "sleep.at_s[{nsleep}]"),
    (lambda d: d["faults"].append({"kind": "stuck", "start_s": 1e9, "duration_s": 1}),
     "faults[{nfaults}].start_s"),
    (lambda d: d["network"]["disconnects"].append([1e9, 1]),
     "network.disconnects[{ndisc}]"),
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_dicts(), st.sampled_from(BREAKERS))
def test_any_rule_broken_raises_naming_the_key(d, breaker):
    mutate, key = breaker
    d = copy.deepcopy(d)
    fmt = {"nbase": len(d["classes"]["base"]), "nsleep": len(d["sleep"]["at_s"]),
           "nfaults": len(d["faults"]), "ndisc": len(d["network"]["disconnects"])}
    mutate(d)
    key = key.format(last=len(d["phases"]) - 1, **fmt)
    with pytest.raises(ConfigError) as err:
        scenario_from_dict(d)
    assert key in str(err.value), str(err.value)


def test_the_example_in_the_docs_loads(tmp_path):
    text = (Path(__file__).resolve().parents[2] / "docs" / "scenarios.md").read_text()
    example = text.split("## Example", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.toml"
    path.write_text(example)
    s = load_scenario(path)
    assert s.name == "factory-vibration" and s.new_classes() == {"outer_race": 60.0}
