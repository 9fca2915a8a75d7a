"""The sensor models: one check suite run against every model, then each model's physics."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dataset import load_dataset
from agent.errors import ConfigError
from firmware_sim.sensors import MODELS, SensorModel, get_model, make_dataset
from firmware_sim.sensors.imu import body_rates, specific_force
from firmware_sim.sensors.vibration import bearing_frequencies

WINDOW = {"imu": 128, "vibration": 256, "environment": 128}
REQUIRED = {"imu": {"idle", "walk", "run", "stairs", "fall"},
            "vibration": {"healthy", "imbalance", "misalignment", "outer_race", "inner_race",
                          "looseness"},
            "environment": {"normal", "hvac_fault", "door_open", "fire"}}
NAMES = sorted(MODELS)


@pytest.fixture(params=NAMES)
def model(request) -> SensorModel:
    return get_model(request.param)


# ---- the shared suite -------------------------------------------------------------------


def test_model_describes_itself(model):
    assert model.name in MODELS and isinstance(model, MODELS[model.name])
    assert len(model.channels) == len(model.units) >= 3
    assert len(set(model.channels)) == len(model.channels)
    assert model.rate_hz > 0
    assert REQUIRED[model.name] <= set(model.classes)
    assert get_model(model.name, **model.params).params == model.params


def test_every_class_has_the_right_shape_and_is_finite(model):
    rng = np.random.default_rng(0)
    C = len(model.channels)
    for cls in model.classes:
        w = model.window(cls, 200, rng)
        assert w.shape == (200, C) and w.dtype == np.float32 and np.isfinite(w).all(), cls
        src = model.source(cls, seed=1)
        x = src.read(150)
        assert x.shape == (150, C) and x.dtype == np.float32 and np.isfinite(x).all(), cls
        assert src.cls == cls and src.n_read == 150
        assert src.t_s == pytest.approx(150 / model.rate_hz)
    assert model.window(model.classes[0], 0, rng).shape == (0, C)


def _stream(model, seed, plan, chunks=None):
    """Read `plan` [(class, n), ...] from one source, in `chunks[i]` pieces per segment."""
    src = model.source(plan[0][0], seed)
    out = []
    for i, (cls, n) in enumerate(plan):
        if i:
            src.set_class(cls)
        sizes = chunks[i] if chunks else [n]
        out += [src.read(k) for k in sizes]
    return np.concatenate(out)


def test_same_seed_same_bytes_different_seed_differs(model):
    plan = [(model.classes[1], 300), (model.classes[-1], 300), (model.classes[0], 200)]
    a = _stream(model, 7, plan)
    assert a.tobytes() == _stream(model, 7, plan).tobytes()
    assert a.tobytes() == _stream(model, np.random.SeedSequence(7), plan).tobytes()
    assert not np.allclose(a, _stream(model, 8, plan))
    X, y, _ = make_dataset(model, 3, 64, seed=2)
    X2, y2, _ = make_dataset(model, 3, 64, seed=2)
    assert X.tobytes() == X2.tobytes() and y.tobytes() == y2.tobytes()
    assert not np.allclose(X, make_dataset(model, 3, 64, seed=3)[0])


def _split(draw, n: int) -> list[int]:
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    return [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(NAMES), data=st.data())
def test_chunking_does_not_change_the_stream(name, data):
    model = get_model(name)
    plan = data.draw(st.lists(st.tuples(st.sampled_from(model.classes), st.integers(0, 300)),
                              min_size=1, max_size=4))
    chunks = [_split(data.draw, n) for _, n in plan]
    whole = _stream(model, 11, plan)
    assert _stream(model, 11, plan, chunks).tobytes() == whole.tobytes()


def test_class_switch_does_not_jump(model):
    # The step at each switch is within the signal's own steps within bouts (a switch may
    # land on a steep stretch, e.g. the end of a growing fire: hence the margin).
    n = int(round(60 * model.rate_hz)) if model.name == "environment" else 400
    classes = list(model.classes)
    x = _stream(model, 5, [(c, n) for c in classes + classes[::-1]]).astype(float)
    steps = np.abs(np.diff(x, axis=0))  # (N - 1, C)
    at_switch = np.zeros(len(steps), bool)
    at_switch[np.arange(n - 1, len(steps), n)] = True
    assert (steps[at_switch].max(0) <= 1.5 * steps[~at_switch].max(0)).all()


def test_set_class_starts_a_new_bout(model):
    cls = model.classes[0]
    src, other = model.source(cls, 3), model.source(cls, 3)
    src.read(50)
    other.read(50)
    src.set_class(cls)
    assert not np.array_equal(src.read(200), other.read(200))


def test_make_dataset_layout(model):
    X, y, classes = make_dataset(model, 4, 32, seed=1)
    C = len(model.channels)
    assert classes == model.classes
    assert X.shape == (4 * len(classes), C, 32) and X.dtype == np.float32
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [4] * len(classes)
    sub = (model.classes[-1], model.classes[0])
    X, y, classes = make_dataset(model, 2, 16, classes=sub)
    assert classes == sub and X.shape == (4, C, 16) and sorted(set(y.tolist())) == [0, 1]


def test_bad_input_is_refused_with_the_bad_value(model):
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match=f"'swim' for sensor model '{model.name}'"):
        model.window("swim", 8, rng)
    with pytest.raises(ConfigError, match="'swim'"):
        model.source("swim", 0)
    src = model.source(model.classes[0], 0)
    with pytest.raises(ConfigError, match="'swim'"):
        src.set_class("swim")
    assert src.cls == model.classes[0]
    with pytest.raises(ValueError, match="n=-1"):
        src.read(-1)
    with pytest.raises(ConfigError, match="'swim'"):
        make_dataset(model, 2, 8, classes=[model.classes[0], "swim"])
    with pytest.raises(ConfigError, match="Invalid classes"):
        make_dataset(model, 2, 8, classes=[model.classes[0]] * 2)
    with pytest.raises(ConfigError, match="n_per_class: 0"):
        make_dataset(model, 0, 8)
    with pytest.raises(ConfigError, match="window: 0"):
        make_dataset(model, 1, 0)


def test_get_model_names_the_bad_model_or_parameter():
    with pytest.raises(ConfigError, match="Unknown sensor model 'sonar'.*imu"):
        get_model("sonar")
    with pytest.raises(ConfigError, match=r"Unknown parameter imu\.rpm \(expected one of rate_hz"):
        get_model("imu", rpm=10)
    with pytest.raises(ConfigError, match=r"vibration\.rpm: -5"):
        get_model("vibration", rpm=-5)
    with pytest.raises(ConfigError, match=r"vibration\.n_balls: 2\.5"):
        get_model("vibration", n_balls=2.5)
    with pytest.raises(ConfigError, match=r"vibration\.rpm: 20000 .*Nyquist"):
        get_model("vibration", rpm=20000)
    with pytest.raises(ConfigError, match=r"vibration\.resonance_hz: 600"):
        get_model("vibration", resonance_hz=600)
    with pytest.raises(ConfigError, match=r"environment\.rate_hz: 'fast'"):
        get_model("environment", rate_hz="fast")
    with pytest.raises(ConfigError, match=r"imu\.noise_scale: nan"):
        get_model("imu", noise_scale=float("nan"))


# ---- separability: the classes are what a simple baseline can tell apart ----------------


def _features(X: np.ndarray) -> np.ndarray:
    """Per channel: the mean and the log power in 16 bands of the spectrum."""
    power = np.abs(np.fft.rfft(X - X.mean(-1, keepdims=True), axis=-1))[..., 1:] ** 2
    bands = np.stack([b.mean(-1) for b in np.array_split(power, 16, axis=-1)], axis=-1)
    return np.concatenate([X.mean(-1), np.log(bands + 1e-12).reshape(len(X), -1)], axis=1)


@pytest.mark.parametrize("name", NAMES)
def test_classes_are_separable_by_a_simple_baseline(name):
    # A failure means the generator broke (classes collapsed), not that a model is weak.
    from sklearn.linear_model import LogisticRegression

    model = get_model(name)
    X, y, classes = make_dataset(model, 60, WINDOW[name], seed=0)
    X_test, y_test, _ = make_dataset(model, 40, WINDOW[name], seed=1)
    F, F_test = _features(X), _features(X_test)
    mu, sd = F.mean(0), F.std(0) + 1e-9
    F, F_test = (F - mu) / sd, (F_test - mu) / sd
    centroids = np.stack([F[y == k].mean(0) for k in range(len(classes))])
    pred = np.argmin(((F_test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    ncm = (pred == y_test).mean()
    logistic = LogisticRegression(max_iter=1000).fit(F, y).score(F_test, y_test)
    assert ncm >= 0.9, f"{name}: nearest-class-mean accuracy {ncm:.3f}"
    assert logistic >= 0.95, f"{name}: logistic-regression accuracy {logistic:.3f}"


# ---- imu --------------------------------------------------------------------------------


def test_imu_at_rest_reads_one_g_and_no_rotation():
    x = get_model("imu").source("idle", 2).read(500)
    assert np.linalg.norm(x[:, :3].mean(0)) == pytest.approx(1.0, abs=0.03)
    assert np.abs(x[:, 3:].mean(0)).max() < 0.03  # rad/s: only the bias


def test_imu_gravity_rotates_with_the_device():
    # Rocking on its side: |a| stays ~1 g while gravity swings between the axes.
    x = get_model("imu", noise_scale=0, bias_scale=0).source("tilt", 4).read(500)
    mag = np.linalg.norm(x[:, :3], axis=1)
    assert np.abs(mag - 1).max() < 0.05
    assert x[:, :3].std(0).max() > 0.1
    angle = np.unwrap(np.arctan2(x[:, 0], x[:, 2]))
    assert np.ptp(angle) > math.radians(15)


@pytest.mark.parametrize("seed", range(5))
def test_imu_gyroscope_agrees_with_the_rotation_of_gravity(seed):
    # Oracle: a world-fixed vector seen from a rotating body changes as v' = -w x v, so the
    # derivative of the accelerometer (no linear acceleration) must match the gyroscope.
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 2, 20_001)[:, None]
    dt = t[1, 0] - t[0, 0]
    amp, freq, phase = rng.uniform(-1.5, 1.5, 3), rng.uniform(0.2, 2, 3), rng.uniform(0, 6, 3)
    angles = amp * np.sin(2 * np.pi * freq * t + phase)  # (n, 3) roll, pitch, yaw
    rates = amp * 2 * np.pi * freq * np.cos(2 * np.pi * freq * t + phase)
    f = specific_force(angles, np.zeros_like(angles))
    w = body_rates(angles, rates)
    derivative = (f[2:] - f[:-2]) / (2 * dt)
    np.testing.assert_allclose(derivative, -np.cross(w[1:-1], f[1:-1]), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-12)


def test_imu_fall_is_free_fall_then_impact_then_lying():
    imu = get_model("imu", noise_scale=0, bias_scale=0)
    for seed in range(5):
        x = imu.window("fall", 128, np.random.default_rng(seed)).astype(float)
        mag = np.linalg.norm(x[:, :3], axis=1)
        low = np.flatnonzero(mag < 0.15)
        peak = int(np.argmax(mag))
        assert len(low) >= 10, "free fall: ~0 g for >= 0.2 s"
        assert mag[peak] > 3.0 and peak > low[0], "an impact after the free fall"
        assert np.abs(x[low, 3:]).max() > 1.0, "the device tumbles while falling"
        still = x[-10:]
        assert np.linalg.norm(still[:, :3], axis=1) == pytest.approx(1.0, abs=0.05)
        assert np.abs(still[:, 3:]).max() < 0.05
        before = x[0, :3] / np.linalg.norm(x[0, :3])
        after = still[:, :3].mean(0) / np.linalg.norm(still[:, :3].mean(0))
        assert np.degrees(np.arccos(np.clip(before @ after, -1, 1))) > 45, "it ends lying"


def test_imu_gait_runs_at_the_step_rate():
    imu = get_model("imu")
    for cls, lo, hi in (("walk", 1.5, 2.1), ("run", 2.4, 3.2)):
        x = imu.source(cls, 1).read(1024)[:, 2].astype(float)
        f = np.fft.rfftfreq(1024, 1 / imu.rate_hz)
        spec = np.abs(np.fft.rfft(x - x.mean()))
        assert lo < f[np.argmax(spec)] < hi, cls


def test_imu_saturates_at_its_range():
    x = get_model("imu", accel_range_g=2.0).window("fall", 128, np.random.default_rng(0))
    assert np.abs(x[:, :3]).max() == pytest.approx(2.0)


# ---- vibration --------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(rpm=st.floats(60, 10_000), n=st.integers(3, 30), d=st.floats(1, 40),
       ratio=st.floats(1.2, 10), angle=st.floats(0, 40))
def test_bearing_frequencies_match_the_textbook_formulas(rpm, n, d, ratio, angle):
    D = d * ratio
    f = bearing_frequencies(rpm, n, d, D, angle)
    fr = rpm / 60
    c = d / D * math.cos(math.radians(angle))
    assert f["bpfo"] == pytest.approx(n * fr / 2 * (1 - c))
    assert f["bpfi"] == pytest.approx(n * fr / 2 * (1 + c))
    assert f["bpfo"] + f["bpfi"] == pytest.approx(n * fr)  # the classic check
    assert f["ftf"] * n == pytest.approx(f["bpfo"])  # the cage carries the balls past the race


def _envelope_spectrum(x: np.ndarray, rate_hz: float, band: tuple[float, float]):
    """Band-pass around the resonance, Hilbert envelope, its spectrum: the standard
    bearing-diagnosis oracle."""
    n = len(x)
    f = np.fft.rfftfreq(n, 1 / rate_hz)
    X = np.fft.rfft(x)
    X[(f < band[0]) | (f > band[1])] = 0
    h = np.zeros(n)
    h[0], h[1:(n + 1) // 2] = 1, 2
    if n % 2 == 0:
        h[n // 2] = 1
    env = np.abs(np.fft.ifft(np.fft.fft(np.fft.irfft(X, n)) * h))
    return f, np.abs(np.fft.rfft(env - env.mean()))


def _peak_ratio(f, spec, at_hz, tol_hz=1.0):
    """Height of the spectrum near `at_hz` over its median level between 20 and 300 Hz."""
    near = np.abs(f - at_hz) <= tol_hz
    floor = np.median(spec[(f > 20) & (f < 300)])
    return spec[near].max() / floor


@pytest.mark.parametrize("rpm", [1200.0, 1800.0])
def test_bearing_faults_show_at_their_characteristic_frequencies(rpm):
    vib = get_model("vibration", rpm=rpm, rpm_jitter=0.0)
    freqs = bearing_frequencies(rpm, 9, 7.94, 39.04, 0.0)  # the 6205 default, by the formula
    band = (vib.resonance_hz - 150, vib.resonance_hz + 150)  # envelope lines up to 300 Hz
    ratios = {}
    for cls in ("outer_race", "inner_race", "healthy"):
        x = vib.source(cls, 0).read(8000)[:, 1].astype(float)  # 8 s: 0.125 Hz bins
        f, spec = _envelope_spectrum(x, vib.rate_hz, band)
        ratios[cls] = {k: _peak_ratio(f, spec, freqs[k]) for k in ("bpfo", "bpfi")}
    assert ratios["outer_race"]["bpfo"] > max(20, 5 * ratios["outer_race"]["bpfi"])
    assert ratios["inner_race"]["bpfi"] > max(20, 5 * ratios["inner_race"]["bpfo"])
    assert max(ratios["healthy"].values()) < 6


def _line(x: np.ndarray, rate_hz: float, hz: float) -> float:
    """Amplitude of the spectral line at `hz` (Hann window, amplitude-corrected)."""
    w = np.hanning(len(x))
    spec = np.abs(np.fft.rfft((x - x.mean()) * w)) * 2 / w.sum()
    f = np.fft.rfftfreq(len(x), 1 / rate_hz)
    return spec[np.abs(f - hz) <= 1.0].max()


def test_shaft_faults_have_their_textbook_signatures():
    vib = get_model("vibration", rpm=1800, rpm_jitter=0.0)
    fr = 30.0

    def lines(cls, axis):
        x = vib.source(cls, 1).read(4000)[:, axis].astype(float)
        return {order: _line(x, vib.rate_hz, order * fr) for order in (0.5, 1, 1.5, 2, 3, 5)}

    healthy, imbalance = lines("healthy", 0), lines("imbalance", 0)
    assert imbalance[1] > 5 * healthy[1] and imbalance[1] > 5 * imbalance[2]
    radial, axial = lines("misalignment", 0), lines("misalignment", 2)
    assert radial[2] > radial[1] and axial[1] > 3 * healthy[1] and axial[2] > 0.1
    loose = lines("looseness", 1)
    assert min(loose[k] for k in (0.5, 1.5, 3, 5)) > 3 * max(healthy[0.5], healthy[3])


# ---- environment ------------------------------------------------------------------------


def test_environment_readings_are_physical():
    env = get_model("environment")
    for cls in env.classes:
        x = env.source(cls, 3).read(600).astype(float)
        temperature, humidity, pressure, co2 = x.T
        assert (-30 < temperature).all() and (temperature < 100).all(), cls
        assert (0 <= humidity).all() and (humidity <= 100).all(), cls
        assert (950 < pressure).all() and (pressure < 1080).all(), cls
        assert (300 < co2).all() and (co2 < 20_000).all(), cls


def test_environment_classes_do_what_they_say():
    env = get_model("environment", outdoor_c=0.0)
    normal = env.source("normal", 1).read(300).astype(float)
    assert np.ptp(normal[:, 0]) < 1.0  # degC in five minutes
    door = env.source("door_open", 1).read(300).astype(float)
    assert door[:, 0].min() < door[0, 0] - 3 and door[:, 3].min() < door[0, 3] - 50
    fire = env.source("fire", 1).read(300).astype(float)
    assert fire[-1, 0] > fire[0, 0] + 20 and fire[-1, 3] > fire[0, 3] + 1000
    assert fire[-1, 1] < fire[0, 1]  # warmer air holds more: relative humidity falls
    hvac = env.source("hvac_fault", 1).read(600).astype(float)
    assert np.ptp(hvac[:, 0]) > 1.0


def test_environment_room_continues_across_classes():
    env = get_model("environment")
    src = env.source("fire", 2)
    hot = src.read(200)
    src.set_class("normal")
    after = src.read(600)
    assert abs(after[0, 0] - hot[-1, 0]) < 1.5  # no jump: the heat decays away
    assert after[-1, 0] < hot[-1, 0] - 5


# ---- the CLI ----------------------------------------------------------------------------


def test_cli_dataset_model(tmp_path, capsys):
    from agent.cli import main as reverie_main

    out = tmp_path / "vib.npz"
    rc = reverie_main(["sim", "dataset", "--model", "vibration", "--out", str(out),
                       "--n-per-class", "3", "--window", "64",
                       "--classes", "healthy,outer_race"])
    assert rc == 0 and "3 x 64" in capsys.readouterr().out
    ds = load_dataset(out)
    assert ds.classes == ("healthy", "outer_race") and ds.input_shape == (3, 64)
    assert ds.channels == ("x", "y", "z") and ds.sample_rate_hz == 1000.0
    assert reverie_main(["sim", "dataset", "--model", "sonar", "--out", str(out)]) == 2
    assert "'sonar'" in capsys.readouterr().err
    assert reverie_main(["sim", "dataset", "--model", "imu", "--out", str(out),
                         "--classes", "swim"]) == 2
    assert "'swim'" in capsys.readouterr().err
