"""``reverie demo``: watch the agent learn new classes, on one machine, in a few minutes.

1. a broker: a private mosquitto (else in-process amqtt), or ``--broker URL``;
2. a base model trained on the scenario's *base* classes the first time (cached under
   ``--out``/models, keyed by the scenario's model, parameters, classes and window and by
   the code that generates and trains: a change to any of them retrains);
3. the agent daemon (``reverie run``, a real subprocess, gateway mode) with a fresh state
   directory, a short sleep budget and /metrics on a free port;
4. the scenario (`firmware_sim.runner.ScenarioRunner`): devices stream, new classes appear,
   labels arrive sparsely through the oracle, sleep commands at the scenario's times;
5. a live dashboard (`firmware_sim.dashboard`) of the agent's predictions scored against
   the runner's ground truth (`firmware_sim.report.Scoreboard`);
6. at the end, ``<out>/<scenario>.png`` and ``<out>/<scenario>.json`` (`write_report`).

Every run uses its own topic prefix (``reverie/demo-<hex>``), so a shared broker's other
traffic, retained messages or a previous run cannot leak into the scores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from agent.errors import ConfigError

DEFAULT_SCENARIO = "wearable-imu"
SHORT_SCENARIO = "smoke"
TARGET_STREAM_WALL_S = 60.0      # default --speed: the stream takes about this long
SHORT_STREAM_WALL_S = 12.0
# Base-model training: seconds on 2 cores. One torch thread: on a busy 2-core machine two
# threads took 2-5x longer (spinning).
TRAINING = {"n_per_class": 200, "epochs": 30, "threads": 1}
SLEEP_BUDGET_S = 5.0             # per commanded sleep (wall s): demo-sized
SIGNALS_BUNDLE_NAME = "demo-base-v2"  # `ensure_bundle`'s; bump when firmware_sim.signals changes
RECIPE = 3                       # bump when the training recipe below changes
ONLINE_TIMEOUT_S = 60.0
TAIL_QUIET_S, TAIL_MAX_S = 1.5, 15.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="local demo: the agent learns new classes on a simulated scenario",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default=None, metavar="NAME|FILE",
                   help=f"a shipped scenario or a TOML file (default {DEFAULT_SCENARIO}; "
                        f"--short: {SHORT_SCENARIO})")
    p.add_argument("--short", action="store_true",
                   help=f"the {SHORT_SCENARIO!r} scenario, fast (~30 s; what the tests run)")
    p.add_argument("--broker", default=None, metavar="URL",
                   help="use this broker instead of starting an embedded one (mqtt://HOST:PORT)")
    p.add_argument("--out", default=os.environ.get("REVERIE_DEMO_DIR", ".reverie/demo"),
                   metavar="DIR", help="cached models, the agent's state and the report "
                                       "(default .reverie/demo)")
    p.add_argument("--speed", type=float, default=None, metavar="X",
                   help="stream seconds per wall second (default: the scenario in about "
                        f"{TARGET_STREAM_WALL_S:.0f} s, --short {SHORT_STREAM_WALL_S:.0f} s)")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="override the scenario's device count")
    p.add_argument("--quiet", action="store_true",
                   help="log lines every few seconds instead of the live dashboard")
    p.add_argument("--retrain", action="store_true", help="ignore the cached base model")
    p.add_argument("--bundle", default=None, metavar="DIR",
                   help="use this bundle (trained on the scenario's base classes)")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default=None,
                   help="MQTT version (default: 5 when the broker speaks it)")
    p.set_defaults(func=cmd_demo)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# --- the base model ----------------------------------------------------------------


def _code_hash() -> str:
    """sha256 over the sources that generate the data and train the model."""
    import export
    import firmware_sim.sensors as sensors

    h = hashlib.sha256()
    for pkg in (sensors, export):
        for f in sorted(Path(pkg.__file__).parent.glob("*.py")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def bundle_key(scenario) -> str:
    """What the cached base model depends on, hashed (16 hex digits)."""
    from agent import __version__

    spec = {"model": scenario.model, "params": scenario.model_params,
            "base": list(scenario.base_classes), "window": scenario.window_samples,
            "seed": scenario.seed, "training": TRAINING, "recipe": RECIPE, "version": __version__, "code": _code_hash()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ensure_base_bundle(scenario, models_dir: Path, *, retrain: bool = False
                       ) -> tuple[Path, float]:
    """The cached base bundle for `scenario`, trained if missing; (path, seconds spent)."""
    from agent.bundle import load_bundle
    from agent.errors import BundleError

    key = bundle_key(scenario)
    root = models_dir / f"{scenario.model}-{key}"  # scenarios that agree share a model
    bundle_dir = root / "bundle"
    if not retrain and bundle_dir.exists():
        try:
            load_bundle(bundle_dir)
            _say(f"using the cached base model {bundle_dir}")
            return bundle_dir, 0.0
        except BundleError as exc:
            _say(f"cached base model unusable ({exc}): retraining")
    t0 = time.perf_counter()  # torch's import is part of the cost
    from agent.dataset import save_dataset
    from export import train_bundle
    from firmware_sim.sensors import get_model, make_dataset

    model = get_model(scenario.model, **scenario.model_params)
    X, y, classes = make_dataset(model, TRAINING["n_per_class"], scenario.window_samples,
                                 seed=scenario.seed, classes=scenario.base_classes)
    root.mkdir(parents=True, exist_ok=True)
    data = save_dataset(root / "train.npz", X, y, classes=classes, channels=model.channels,
                        sample_rate_hz=model.rate_hz)
    _say(f"training the base model on {', '.join(classes)} ({len(y)} windows of "
         f"{scenario.window_samples} samples); first run only")
    train_bundle(data, bundle_dir, epochs=TRAINING["epochs"], seed=scenario.seed,
                 threads=TRAINING["threads"],
                 name=f"demo-{scenario.model}-{key}", force=True, verbose=False)
    took = time.perf_counter() - t0
    _say(f"trained and exported in {took:.1f} s -> {bundle_dir}")
    return bundle_dir, took


def ensure_bundle(cache_dir: Path, *, retrain: bool = False, seed: int = 0) -> Path:
    """The 6-channel `firmware_sim.signals` bundle (idle/walk/run/stairs/shake/tilt) that
    ``reverie bench e2e`` loads its daemon with: ``cache_dir/bundle``, trained if missing."""
    from agent.bundle import load_bundle
    from agent.errors import BundleError

    bundle_dir = cache_dir / "bundle"
    if not retrain and bundle_dir.exists():
        try:
            if load_bundle(bundle_dir).manifest.get("name") == SIGNALS_BUNDLE_NAME:
                return bundle_dir
        except BundleError:
            pass
    from export import train_bundle
    from firmware_sim.signals import write_dataset

    cache_dir.mkdir(parents=True, exist_ok=True)
    data = write_dataset(cache_dir / "train.npz", n_per_class=200, seed=seed)
    return train_bundle(data, bundle_dir, name=SIGNALS_BUNDLE_NAME, seed=seed, force=True)


# --- the agent -----------------------------------------------------------------------


def agent_config(path: Path, *, bundle: Path, url: str, prefix: str, protocol: str,
                 state_dir: Path, metrics_port: int) -> Path:
    """The agent's TOML: gateway, fresh session, demo-sized sleeps, metrics on."""
    q = json.dumps  # a TOML basic string is a JSON string for these values
    path.write_text(f"""# written by `reverie demo`
[agent]
bundle = {q(str(bundle.absolute()))}
device_id = "+"
prefix = {q(prefix)}
state_dir = {q(str(state_dir.absolute()))}

[broker]
url = {q(url)}
protocol = {q(protocol)}
session_expiry_s = 0      # a fresh session per run: nothing queued from an earlier one

[sleep]
budget_s = {SLEEP_BUDGET_S}
max_duration_s = {2 * SLEEP_BUDGET_S}

[metrics]
listen = "127.0.0.1:{metrics_port}"

[logging]
level = "info"
""", encoding="utf-8")
    return path


def read_metrics(port: int, timeout_s: float = 1.0) -> dict[str, float]:
    """``{series: value}`` from the agent's /metrics (series with labels as written)."""
    from agent.bench.e2e.procs import parse_metrics

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
        return parse_metrics(r.read().decode())


class _Agent:
    """``reverie run`` as a subprocess, its output in a log file."""

    def __init__(self, config: Path, log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def tail(self, n: int = 15) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> int | None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc


# --- the run -------------------------------------------------------------------------


def _choose(args: argparse.Namespace):
    from firmware_sim.scenario import load_scenario

    scenario = load_scenario(args.scenario or (SHORT_SCENARIO if args.short else DEFAULT_SCENARIO))
    speed = args.speed
    if speed is None:
        target = SHORT_STREAM_WALL_S if args.short else TARGET_STREAM_WALL_S
        speed = max(1.0, round(scenario.duration_s / target, 1))
    if not speed > 0 or speed != speed or speed == float("inf"):
        raise ConfigError(f"Invalid --speed: {speed!r} (expected a finite number > 0)")
    if args.devices is not None and args.devices < 1:
        raise ConfigError(f"Invalid --devices: {args.devices!r} (expected a count >= 1)")
    return scenario, speed


def cmd_demo(args: argparse.Namespace) -> int:
    from firmware_sim.broker import EmbeddedBroker, free_port
    from firmware_sim.dashboard import Dashboard
    from firmware_sim.report import Scoreboard, rolling_n_for, summary_lines, write_report
    from firmware_sim.runner import ScenarioRunner

    t_start = time.monotonic()
    scenario, speed = _choose(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.bundle:
        bundle_dir, train_s = Path(args.bundle), 0.0
    else:
        bundle_dir, train_s = ensure_base_bundle(scenario, out / "models", retrain=args.retrain)

    broker = agent = probe = dash = None
    try:
        if args.broker:
            url = args.broker
        else:
            broker = EmbeddedBroker(prefer="auto").start()
            url = broker.url
            _say(f"embedded broker: {broker.kind} on {url}")
        protocol = args.protocol or ("5" if broker is None or "5" in broker.protocols else "3.1.1")
        prefix = f"reverie/demo-{uuid.uuid4().hex[:8]}"
        run_dir = out / "run"
        shutil.rmtree(run_dir, ignore_errors=True)  # the agent starts from the base model
        (run_dir / "state").mkdir(parents=True)
        metrics_port = free_port()
        config = agent_config(run_dir / "agent.toml", bundle=bundle_dir, url=url, prefix=prefix,
                              protocol=protocol, state_dir=run_dir / "state",
                              metrics_port=metrics_port)
        runner = ScenarioRunner(scenario, url, prefix=prefix, protocol=protocol, speed=speed,
                                devices=args.devices)
        board = Scoreboard(scenario=scenario.name, classes=scenario.classes,
                           base_classes=scenario.base_classes, timeline=runner.timeline,
                           frame_s=runner.frame_s, duration_s=scenario.duration_s,
                           devices=len(runner.devices), truth=runner.truth,
                           rolling_n=rolling_n_for(len(runner.devices) * runner.n_frames
                                                   * runner.frame_samples
                                                   / scenario.window_samples))
        runner.on_frame, runner.on_label, runner.on_event = (
            board.on_frame, board.on_label_sent, board.on_timeline)

        online = threading.Event()
        probe = _subscribe(url, protocol, prefix, board, online)
        agent = _Agent(config, run_dir / "agent.log")
        t_agent = time.monotonic()
        while not online.wait(0.2):
            if agent.proc.poll() is not None or time.monotonic() - t_agent > ONLINE_TIMEOUT_S:
                _say(f"the agent did not come online; its log ({agent.log_path}):\n"
                     + agent.tail())
                return 1
        _say(f"agent online in {time.monotonic() - t_agent:.1f} s (topics {prefix}/..., "
             f"log {agent.log_path}); scenario {scenario.name!r}: {len(runner.devices)} "
             f"devices, {scenario.duration_s:.0f} s at {speed:g}x, new classes "
             f"{', '.join(scenario.new_classes()) or 'none'}")

        metrics = _MetricsPoller(metrics_port, board)
        live = sys.stdout.isatty() and not args.quiet
        dash = Dashboard(metrics.snapshot, live=live).start()
        t_stream = time.monotonic()
        stats = runner.run()
        stream_wall_s = time.monotonic() - t_stream
        _wait_tail(board)
        metrics.poll()
        dash.stop()
        dash = None
        probe.loop_stop()  # the scores are final from here on
        probe.disconnect()
        probe = None
        sim = runner.summary()
        elapsed = time.monotonic() - t_start
        png, js = write_report(board, out, scenario.name, extra={
            "description": scenario.description,
            "devices": len(runner.devices), "speed": speed,
            "stream_s": scenario.duration_s,
            "durations_s": {"total": round(elapsed, 1), "training": round(train_s, 1),
                            "stream_wall": round(stream_wall_s, 1)},
            "throughput": {"windows_per_s": round(len(board.records) / max(stream_wall_s, 1e-9), 2),
                           "frames_sent": sum(stats.frames_sent.values()),
                           "sample_rate_hz": round(stats.sample_rate_hz, 1),
                           "target_sample_rate_hz": stats.target_sample_rate_hz},
            "simulator": sim,
            "paths": {"bundle": str(bundle_dir), "agent_log": str(agent.log_path),
                      "state_dir": str(run_dir / "state")}})
        summary = json.loads(js.read_text())
        for line in summary_lines(summary):
            _say(line)
        if not summary["windows"]:
            _say("no predictions arrived: something is wrong (see the agent log)")
            return 1
        return 0
    finally:
        if dash is not None:
            dash.stop()
        if probe is not None:
            probe.loop_stop()
            probe.disconnect()
        if agent is not None:
            rc = agent.stop()
            if rc not in (0, -signal.SIGTERM):
                _say(f"agent exited with {rc}; see {agent.log_path}")
        if broker is not None:
            broker.stop()


def _subscribe(url: str, protocol: str, prefix: str, board, online: threading.Event):
    """A client feeding the agent's predictions and events to `board`; sets `online` when
    the agent's status says so."""
    from agent.errors import BrokerError
    from agent.mqtt import BrokerURL, make_client
    from agent.protocol import decode_json_object
    from agent.topics import Topics

    topics = Topics("+", prefix)

    def on_message(_c, _u, msg) -> None:
        try:
            body = decode_json_object(msg.payload, msg.topic)
        except Exception:  # noqa: BLE001 - a demo printer must not die
            return
        kind = msg.topic.rsplit("/", 1)[-1]
        if kind == "predictions":
            board.on_prediction(body)
        elif kind == "events":
            board.on_event(body)
        elif kind == "status" and body.get("state") == "online":
            online.set()

    client = make_client(BrokerURL.parse(url), protocol=protocol)
    client.on_message = on_message
    connected = threading.Event()
    client.on_connect = lambda c, *_: (
        c.subscribe([(topics.predictions, 0), (topics.events, 0),
                     (Topics("gateway", prefix).status, 1)]), connected.set())
    b = BrokerURL.parse(url)
    client.connect(b.host, b.port)
    client.loop_start()
    if not connected.wait(10):
        client.loop_stop()
        raise BrokerError(f"cannot connect to {url}")
    return client


class _MetricsPoller:
    """The scoreboard's snapshot with the memory fill from /metrics, at most once a second."""

    def __init__(self, port: int, board):
        self.port, self.board, self._last = port, board, 0.0

    def poll(self) -> None:
        self._last = time.monotonic()
        try:
            m = read_metrics(self.port)
        except OSError:  # not up yet, or gone
            return
        self.board.set_memory(int(m.get("reverie_memory_episodes", 0)),
                              int(m.get("reverie_memory_capacity", 0)))

    def snapshot(self):
        if time.monotonic() - self._last >= 1.0:
            self.poll()
        return self.board.snapshot()


def _wait_tail(board) -> None:
    """Until the agent has predicted the last windows, answered every label and finished
    a running sleep (at most TAIL_MAX_S)."""
    deadline = time.monotonic() + TAIL_MAX_S
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = len(board.records)
        if n != last:
            last, quiet_since = n, time.monotonic()
        busy = (len(board.sleep_started) > len(board.sleeps)
                or board.labels_learned + board.label_errors < board.labels_sent)
        if not busy and time.monotonic() - quiet_since >= TAIL_QUIET_S:
            return
        time.sleep(0.1)
