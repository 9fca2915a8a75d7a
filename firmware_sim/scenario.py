"""Scenarios: what a fleet of simulated devices does over time, as TOML (docs/scenarios.md).

A scenario names a sensor model (`firmware_sim.sensors`), a device fleet, the base classes
the model is trained on, a timeline of *phases* (each a weighted class mix and a duration;
a class that is not a base class appearing in a later phase is a *new* class), and the
impairments: sensor drift and faults (`firmware_sim.impair.DeviceImpairment`), network
faults (`NetworkShaper`), the label oracle (`Oracle`) and the times the runner asks the
agent to sleep.

Loading is strict, because a typo in a scenario otherwise shows up as a demo that
silently does something else: every key is checked against the schema (an unknown key
gets the closest known one suggested), every value against its type and range, and the
whole file against the timeline (a fault, disconnect or sleep after the end, overlapping
disconnects, a base class missing from the first phase, a declared new class that never
appears, labels no segment can ever get ...). Each refusal is a ConfigError that names
the file, the key as ``section.key`` (``phases[1].mix``) and the reason.

The dataclasses are plain values: `scenario_from_dict` builds them from parsed TOML,
`scenario_to_dict` goes back, so ``scenario_from_dict(scenario_to_dict(s)) == s``.

>>> s = load_scenario("smoke")
>>> s.model, s.duration_s > 0, sorted(s.new_classes()) != []
('imu', True, True)
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from agent.errors import ConfigError
from agent.protocol import MAX_SAMPLES
from firmware_sim._schema import Table, fail, suggest
from firmware_sim.sensors import MODELS, get_model

FAULT_KINDS = ("stuck", "dropout", "saturation")
MAX_DEVICES = 100_000
_PACKAGE_DIR = "scenarios"


@dataclass(frozen=True)
class Phase:
    """A stretch of the timeline: classes drawn by weight, each bout `segment_s` long."""

    name: str
    duration_s: float
    mix: dict[str, float]  # class -> weight, normalised to sum 1; zero weights dropped
    segment_s: tuple[float, float] = (5.0, 20.0)  # (min, max) bout length in seconds


@dataclass(frozen=True)
class Drift:
    """Slow sensor degradation, growing with stream time (see `DeviceImpairment`)."""

    gain_per_h: float = 0.0  # relative gain change per hour
    offset_per_h: float = 0.0  # offset change per hour, in channel units
    noise_growth_per_h: float = 0.0  # extra white-noise std per hour, in channel units
    bias_walk: float = 0.0  # per-sample random-walk step std, in channel units


@dataclass(frozen=True)
class SensorFault:
    kind: str  # "stuck" | "dropout" | "saturation"
    start_s: float
    duration_s: float
    devices: float = 1.0  # fraction of the fleet affected
    channels: tuple[int, ...] = ()  # affected channel indices; () = all
    level: float | None = None  # saturation: values clipped to [-level, level]


@dataclass(frozen=True)
class LabelOracle:
    fraction: float = 0.1  # probability that a class segment is labelled
    delay_s: float = 5.0  # publication delay after the segment ends
    delay_jitter_s: float = 0.0  # uniform +- jitter on the delay
    noise: float = 0.0  # probability that a label names another class
    min_segment_s: float = 2.0  # shorter segments are never labelled


@dataclass(frozen=True)
class Network:
    disconnects: tuple[tuple[float, float], ...] = ()  # (start_s, duration_s), sorted
    burst_prob: float = 0.0  # per frame: a burst of `burst_len` lost frames starts
    burst_len: int = 1
    duplicate_prob: float = 0.0
    reorder_prob: float = 0.0  # per frame: held back until `reorder_depth` later frames
    reorder_depth: int = 2
    malformed_prob: float = 0.0  # per frame: replaced by a realistic broken payload


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    seed: int
    model: str
    model_params: dict  # get_model(model, **model_params)
    devices: int
    frame_samples: int
    window_samples: int  # the agent's window (for datasets and the base model)
    base_classes: tuple[str, ...]
    phases: tuple[Phase, ...]
    drift: Drift = field(default_factory=Drift)
    faults: tuple[SensorFault, ...] = ()
    labels: LabelOracle = field(default_factory=LabelOracle)
    network: Network = field(default_factory=Network)
    sleep_at_s: tuple[float, ...] = ()  # the runner sends {"cmd": "sleep"} at these times

    @property
    def duration_s(self) -> float:
        return math.fsum(p.duration_s for p in self.phases)

    @property
    def phase_starts_s(self) -> tuple[float, ...]:
        starts, t = [], 0.0
        for p in self.phases:
            starts.append(t)
            t += p.duration_s
        return tuple(starts)

    def phase_at(self, t_s: float) -> Phase:
        """The phase running at stream time `t_s` (the last one at or after the end)."""
        for start, phase in zip(self.phase_starts_s[1:], self.phases, strict=False):
            if t_s < start:
                return phase
        return self.phases[-1]

    @property
    def classes(self) -> tuple[str, ...]:
        """Every class used: the base classes, then the others in order of appearance."""
        seen = dict.fromkeys(self.base_classes)
        for p in self.phases:
            seen.update(dict.fromkeys(p.mix))
        return tuple(seen)

    def new_classes(self) -> dict[str, float]:
        """Class -> start (s) of the first phase it appears in, for non-base classes."""
        out: dict[str, float] = {}
        for start, p in zip(self.phase_starts_s, self.phases, strict=True):
            for c in p.mix:
                if c not in self.base_classes and c not in out:
                    out[c] = start
        return out


# --------------------------------------------------------------------------- loading

_TOP = ("name", "description", "seed", "sensor", "devices", "classes", "phases", "drift",
        "faults", "labels", "network", "sleep")
_SCALARS = ("name", "description", "seed")


def list_scenarios() -> list[str]:
    """The names of the scenarios shipped in ``firmware_sim/scenarios``."""
    folder = resources.files("firmware_sim").joinpath(_PACKAGE_DIR)
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir()
                  if p.name.endswith(".toml"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A shipped scenario by name (``"smoke"``) or a TOML file; ConfigError if invalid."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text:
        path = Path(name_or_path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"scenario file {text!r}: no such file") from None
        except OSError as exc:
            raise ConfigError(f"scenario file {text!r}: cannot read ({exc.strerror})") from None
        source = f"scenario file {text!r}"
    else:
        known = list_scenarios()
        if text not in known:
            raise ConfigError(f"unknown scenario {text!r}{suggest(text, known)}; shipped: "
                              f"{', '.join(known)} (or give a path to a .toml file)")
        raw = resources.files("firmware_sim").joinpath(_PACKAGE_DIR, f"{text}.toml").read_bytes()
        source = f"scenario {text!r}"
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML ({exc})") from None
    return scenario_from_dict(data, source)


def scenario_from_dict(d: dict, source: str = "<dict>") -> Scenario:
    """Build and validate a Scenario from parsed TOML; see the module docstring."""
    top = Table(d, "", _TOP, source)
    top.scalars = _SCALARS
    name = top.str("name")
    top.check("name", name.strip() != "" and len(name) <= 64, name, "a non-empty name of at most 64 characters")
    description = top.str("description", "")
    seed = top.int("seed", 0)
    top.check("seed", seed >= 0, seed, "an integer >= 0")

    sensor = top.table("sensor", ("model", "params"))
    model_name = sensor.str("model")
    params = sensor.table_value("params", {})
    sensor.check("model", model_name in MODELS, model_name,
                 f"a sensor model{suggest(model_name, list(MODELS))}: {', '.join(MODELS)}")
    try:
        model = get_model(model_name, **params)
    except ConfigError as exc:
        fail(source, "sensor.params", params, f"parameters of model {model_name!r}: {exc}")
    known_classes, n_channels, rate_hz = tuple(model.classes), len(model.channels), model.rate_hz

    dev = top.table("devices", ("count", "frame_samples", "window_samples"))
    count = dev.int("count", 1)
    dev.check("count", 1 <= count <= MAX_DEVICES, count, f"an integer in 1..{MAX_DEVICES}")
    frame_samples = dev.int("frame_samples", 16)
    dev.check("frame_samples", 1 <= frame_samples <= MAX_SAMPLES, frame_samples,
              f"an integer in 1..{MAX_SAMPLES}")
    window_samples = dev.int("window_samples", 128)
    dev.check("window_samples", window_samples >= 1, window_samples, "an integer >= 1")
    dev.check("frame_samples", frame_samples <= window_samples, frame_samples,
              f"at most devices.window_samples={window_samples} (a frame larger than the "
              "agent's window)")

    cls = top.table("classes", ("base", "new"))
    base = cls.strs("base")
    cls.check("base", len(base) > 0, base, "a non-empty list of class names")
    _check_names(cls, "base", base, known_classes, model_name)
    declared_new = cls.strs("new", None)
    if declared_new is not None:
        _check_names(cls, "new", declared_new, known_classes, model_name)
        both = [c for c in declared_new if c in base]
        cls.check("new", not both, declared_new, f"classes not in classes.base (both list {both})")

    phases = tuple(_phase(t, known_classes, model_name)
                   for t in top.tables("phases", ("name", "duration_s", "mix", "segment_s")))
    if not phases:
        fail(source, "phases", [], "at least one [[phases]] table")
    duration_s = math.fsum(p.duration_s for p in phases)
    for i, p in enumerate(phases):
        if p.name in (q.name for q in phases[:i]):
            fail(source, f"phases[{i}].name", p.name, "a name unique among the phases")
    missing = [c for c in base if c not in phases[0].mix]
    if missing:
        fail(source, "classes.base", base, f"every base class present in the first phase "
             f"{phases[0].name!r} (missing {missing}): the base model sees them from the start")
    used = dict.fromkeys(c for p in phases for c in p.mix)
    if declared_new is not None:
        never = [c for c in declared_new if c not in used]
        if never:
            fail(source, "classes.new", declared_new, f"classes that appear in a phase "
                 f"({never} never do)")
        undeclared = [c for c in used if c not in base and c not in declared_new]
        if undeclared:
            fail(source, "classes.new", declared_new, f"every non-base class used in the "
                 f"phases (missing {undeclared})")
    window_s = window_samples / rate_hz
    dev.check("window_samples", window_s <= duration_s, window_samples,
              f"a window ({window_s:g} s at {rate_hz:g} Hz) no longer than the scenario "
              f"({duration_s:g} s)")

    drift = _drift(top.table("drift", ("gain_per_h", "offset_per_h", "noise_growth_per_h",
                                       "bias_walk")), duration_s)
    faults = tuple(_fault(t, duration_s, n_channels) for t in top.tables(
        "faults", ("kind", "start_s", "duration_s", "devices", "channels", "level")))
    labels = _labels(top.table("labels", ("fraction", "delay_s", "delay_jitter_s", "noise",
                                          "min_segment_s")), phases, len(used | dict.fromkeys(base)))
    network = _network(top.table("network", ("disconnects", "burst_prob", "burst_len",
                                             "duplicate_prob", "reorder_prob",
                                             "reorder_depth", "malformed_prob")), duration_s)
    sleep = top.table("sleep", ("at_s",))
    at_s = sleep.nums("at_s", ())
    for i, t in enumerate(at_s):
        sleep.check(f"at_s[{i}]", 0 < t < duration_s, t,
                    f"a time inside the scenario, 0 < at_s < {duration_s:g} s")
    dup = sorted({t for t in at_s if at_s.count(t) > 1})
    sleep.check("at_s", not dup, list(at_s), f"distinct times ({dup} repeated)")

    return Scenario(name=name, description=description, seed=seed, model=model_name,
                    model_params=dict(params), devices=count, frame_samples=frame_samples,
                    window_samples=window_samples, base_classes=tuple(base), phases=phases,
                    drift=drift, faults=faults, labels=labels, network=network,
                    sleep_at_s=tuple(sorted(at_s)))


def _check_names(t: Table, key: str, names: tuple[str, ...], known: tuple[str, ...],
                 model: str) -> None:
    for i, c in enumerate(names):
        if c not in known:
            fail(t.source, t.key(f"{key}[{i}]"), c,
                 f"a class of model {model!r}{suggest(c, list(known))}; known: {', '.join(known)}")
    dup = sorted({c for c in names if names.count(c) > 1})
    t.check(key, not dup, list(names), f"distinct class names ({dup} repeated)")


def _phase(t: Table, known: tuple[str, ...], model: str) -> Phase:
    name = t.str("name")
    t.check("name", name.strip() != "", name, "a non-empty name")
    duration_s = t.num("duration_s")
    t.check("duration_s", duration_s > 0, duration_s, "a duration > 0 s")
    raw = t.table_value("mix")
    weights: dict[str, float] = {}
    for c, w in raw.items():
        if c not in known:
            fail(t.source, t.key(f"mix.{c}"), w, f"a weight for a class of model {model!r}; "
                 f"{c!r} is not one{suggest(c, list(known))} (known: {', '.join(known)})")
        ok = isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
        t.check(f"mix.{c}", ok, w, "a weight >= 0")
        if w > 0:
            weights[c] = float(w)
    total = math.fsum(weights.values())
    t.check("mix", total > 0, raw, "weights summing to more than 0")
    if abs(total - 1.0) > 1e-9:  # idempotent: a normalised mix stays bit-identical
        weights = {c: w / total for c, w in weights.items()}
    seg = t.nums("segment_s", (5.0, 20.0))
    t.check("segment_s", len(seg) == 2 and 0 < seg[0] <= seg[1], list(seg),
            "[min, max] with 0 < min <= max (seconds)")
    return Phase(name, duration_s, weights, (seg[0], seg[1]))


def _drift(t: Table, duration_s: float) -> Drift:
    gain = t.num("gain_per_h", 0.0)
    t.check("gain_per_h", 1 + gain * duration_s / 3600 > 0, gain,
            f"a gain change that keeps the gain > 0 until the end ({duration_s:g} s)")
    noise, walk = t.num("noise_growth_per_h", 0.0), t.num("bias_walk", 0.0)
    t.check("noise_growth_per_h", noise >= 0, noise, "a value >= 0")
    t.check("bias_walk", walk >= 0, walk, "a step std >= 0")
    return Drift(gain, t.num("offset_per_h", 0.0), noise, walk)


def _fault(t: Table, duration_s: float, n_channels: int) -> SensorFault:
    kind = t.str("kind")
    t.check("kind", kind in FAULT_KINDS, kind, f"one of {', '.join(FAULT_KINDS)}{suggest(kind, list(FAULT_KINDS))}")
    start, dur = t.num("start_s"), t.num("duration_s")
    t.check("start_s", 0 <= start < duration_s, start,
            f"a start inside the scenario, 0 <= start_s < {duration_s:g} s")
    t.check("duration_s", dur > 0, dur, "a duration > 0 s")
    t.check("duration_s", start + dur <= duration_s, dur,
            f"a fault that ends by the scenario's end ({start:g} + {dur:g} > {duration_s:g} s)")
    devices = t.num("devices", 1.0)
    t.check("devices", 0 < devices <= 1, devices, "a fraction of the fleet in (0, 1]")
    channels = t.ints("channels", ())
    for i, c in enumerate(channels):
        t.check(f"channels[{i}]", 0 <= c < n_channels, c,
                f"a channel index in 0..{n_channels - 1}")
    t.check("channels", len(set(channels)) == len(channels), list(channels), "distinct indices")
    level = t.num("level", None)
    if kind == "saturation":
        t.check("level", level is not None and level > 0, level, "a clipping level > 0 "
                "(required for a saturation fault)")
    else:
        t.check("level", level is None, level, f"no level (only saturation faults have one, "
                f"this is {kind!r})")
    return SensorFault(kind, start, dur, devices, channels, level)


def _labels(t: Table, phases: tuple[Phase, ...], n_classes: int) -> LabelOracle:
    fraction, noise = t.num("fraction", 0.1), t.num("noise", 0.0)
    t.check("fraction", 0 <= fraction <= 1, fraction, "a probability in [0, 1]")
    t.check("noise", 0 <= noise <= 1, noise, "a probability in [0, 1]")
    t.check("noise", noise == 0 or n_classes >= 2, noise,
            "0 with a single class (a flipped label needs another class)")
    delay, jitter = t.num("delay_s", 5.0), t.num("delay_jitter_s", 0.0)
    t.check("delay_s", delay >= 0, delay, "a delay >= 0 s")
    t.check("delay_jitter_s", 0 <= jitter <= delay, jitter,
            f"a jitter in [0, delay_s={delay:g}] (a label cannot precede its data)")
    min_seg = t.num("min_segment_s", 2.0)
    longest = max(p.segment_s[1] for p in phases)
    t.check("min_segment_s", min_seg >= 0 and (fraction == 0 or min_seg <= longest), min_seg,
            f"a length >= 0 and <= the longest segment of any phase ({longest:g} s), "
            "else no segment is ever labelled")
    return LabelOracle(fraction, delay, jitter, noise, min_seg)


def _network(t: Table, duration_s: float) -> Network:
    spans = sorted(t.pairs("disconnects", ()))
    for i, (start, dur) in enumerate(spans):
        key = f"disconnects[{i}]"
        t.check(key, 0 <= start < duration_s and dur > 0, [start, dur],
                f"[start_s, duration_s] with 0 <= start_s < {duration_s:g} and duration_s > 0")
        t.check(key, start + dur <= duration_s, [start, dur],
                f"a disconnect that ends by the scenario's end ({duration_s:g} s)")
        if i and start < spans[i - 1][0] + spans[i - 1][1]:
            fail(t.source, t.key(key), [start, dur],
                 f"a disconnect after the previous one ends (overlaps {list(spans[i - 1])})")
    probs = {k: t.num(k, 0.0) for k in ("burst_prob", "duplicate_prob", "reorder_prob",
                                         "malformed_prob")}
    for k, p in probs.items():
        t.check(k, 0 <= p <= 1, p, "a probability in [0, 1]")
    burst_len, depth = t.int("burst_len", 1), t.int("reorder_depth", 2)
    t.check("burst_len", burst_len >= 1, burst_len, "an integer >= 1 (frames)")
    t.check("reorder_depth", depth >= 1, depth, "an integer >= 1 (frames)")
    return Network(tuple(spans), probs["burst_prob"], burst_len, probs["duplicate_prob"],
                   probs["reorder_prob"], depth, probs["malformed_prob"])


def scenario_to_dict(s: Scenario) -> dict:
    """The TOML-shaped dict of `s` (defaults included): the inverse of `scenario_from_dict`."""
    def pick(obj: object, names: tuple[str, ...]) -> dict:
        return {n: getattr(obj, n) for n in names}

    faults = []
    for f in s.faults:
        d = {"kind": f.kind, "start_s": f.start_s, "duration_s": f.duration_s,
             "devices": f.devices, "channels": list(f.channels)}
        if f.level is not None:
            d["level"] = f.level
        faults.append(d)
    net = s.network
    return {
        "name": s.name, "description": s.description, "seed": s.seed,
        "sensor": {"model": s.model, "params": dict(s.model_params)},
        "devices": {"count": s.devices, "frame_samples": s.frame_samples,
                    "window_samples": s.window_samples},
        "classes": {"base": list(s.base_classes)},
        "phases": [{"name": p.name, "duration_s": p.duration_s, "mix": dict(p.mix),
                    "segment_s": list(p.segment_s)} for p in s.phases],
        "drift": pick(s.drift, ("gain_per_h", "offset_per_h", "noise_growth_per_h", "bias_walk")),
        "faults": faults,
        "labels": pick(s.labels, ("fraction", "delay_s", "delay_jitter_s", "noise",
                                  "min_segment_s")),
        "network": {"disconnects": [list(d) for d in net.disconnects],
                    **pick(net, ("burst_prob", "burst_len", "duplicate_prob", "reorder_prob",
                                 "reorder_depth", "malformed_prob"))},
        "sleep": {"at_s": list(s.sleep_at_s)},
    }
