"""The agent daemon: MQTT frames in, one prediction per window out.

Threads:
* paho's network thread only enqueues (topic, payload, arrival time) into a bounded
  queue; when it is full the message is dropped and counted, never blocking the network.
* the worker thread decodes, windows, runs the model and publishes.
* the main thread waits for SIGTERM/SIGINT and then stops cleanly: stop ingest, drain
  what is queued, publish the retained "offline" status, disconnect.

A bad message never kills the daemon: it is counted, reported as an error event on
``{prefix}/{device}/events`` and dropped.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent import __version__
from agent.bundle import Bundle, load_bundle
from agent.errors import ConfigError, ProtocolError
from agent.inference import Classifier
from agent.learner import Learner, LearnerConfig
from agent.mqtt import BrokerURL, make_client
from agent.protocol import (
    MAX_PAYLOAD_BYTES,
    decode_frame,
    encode_event,
    encode_prediction,
    encode_status,
)
from agent.topics import DEFAULT_PREFIX, WILDCARD_DEVICE, Topics, validate_device_id
from agent.windowing import DeviceWindows

log = logging.getLogger("reverie.daemon")


@dataclass(frozen=True)
class DaemonConfig:
    bundle: Path
    broker: BrokerURL
    device_id: str                     # a device id, or "+" to serve every device (gateway)
    prefix: str = DEFAULT_PREFIX
    agent_id: str | None = None        # status topic owner; default device id or "gateway"
    hop_samples: int | None = None     # default: the window length (no overlap)
    threads: int = 1
    queue_size: int = 4096
    max_batch: int = 64
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    protocol: str = "5"
    client_id: str | None = None
    health_file: Path | None = None
    health_interval_s: float = 5.0
    keepalive_s: int = 30
    public_keys: tuple[Path, ...] = ()  # trusted bundle signers; empty: signature not checked
    state_dir: Path | None = None       # the learner's checkpoints and write-ahead log

    def __post_init__(self) -> None:
        keys = self.public_keys
        keys = (keys,) if isinstance(keys, str | Path) else keys
        object.__setattr__(self, "public_keys", tuple(Path(p) for p in keys))
        try:
            validate_device_id(self.device_id, allow_wildcard=True)
            if self.agent_id is not None:
                validate_device_id(self.agent_id)
            Topics(self.device_id, self.prefix)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for name in ("threads", "queue_size", "max_batch", "max_payload_bytes", "keepalive_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}, expected >= 1")
        if self.hop_samples is not None and self.hop_samples < 1:
            raise ConfigError(f"hop_samples={self.hop_samples}, expected >= 1")
        if self.protocol not in ("5", "3.1.1"):
            raise ConfigError(f"protocol={self.protocol!r}, expected '5' or '3.1.1'")

    @property
    def status_owner(self) -> str:
        if self.agent_id:
            return self.agent_id
        return "gateway" if self.device_id == WILDCARD_DEVICE else self.device_id


@dataclass
class Counters:
    received: int = 0
    frames: int = 0
    windows: int = 0
    predictions: int = 0
    novelty: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count

    def as_dict(self) -> dict:
        return {"received": self.received, "frames": self.frames, "windows": self.windows,
                "predictions": self.predictions, "novelty": self.novelty,
                "dropped": dict(self.dropped)}


class Daemon:
    def __init__(self, config: DaemonConfig):
        self.config = config
        self.bundle: Bundle = load_bundle(config.bundle, public_keys=config.public_keys or None)
        if self.bundle.signed_by:
            log.info("bundle %s: signature verified (key %s)", self.bundle.bundle_id,
                     self.bundle.signed_by)
        # A split bundle (encoder.onnx + head.npz) gets the full learner: the head fused with
        # the episodic memory. An older whole-model bundle only predicts.
        self.learner = None
        self.classifier = None
        if "encoder" in self.bundle.manifest:
            self.learner = Learner(self.bundle, LearnerConfig(threads=config.threads),
                                   state_dir=config.state_dir)
        else:
            self.classifier = Classifier(self.bundle, threads=config.threads)
        spec = self.bundle.input
        hop = config.hop_samples or spec.window_samples
        self.windows = DeviceWindows(spec.n_channels, spec.window_samples, hop)
        self.topics = Topics(config.device_id, config.prefix)
        self.status_topic = Topics(config.status_owner, config.prefix).status
        self.counters = Counters()
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._worker = threading.Thread(target=self._work, name="reverie-worker", daemon=True)
        self._client = make_client(config.broker, client_id=config.client_id,
                                   protocol=config.protocol)
        self._client.will_set(self.status_topic, encode_status(state="offline"), qos=1, retain=True)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._last_health = 0.0

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        c = self.config.broker
        log.info("connecting to %s as %s (bundle %s, classes %s)", c, self.status_topic,
                 self.bundle.bundle_id, ",".join(self.bundle.classes))
        self._worker.start()
        self._client.connect_async(c.host, c.port, keepalive=self.config.keepalive_s)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self, drain_timeout_s: float = 3.0) -> None:
        """Stop ingest, drain the queue, publish "offline", disconnect."""
        if self._stop.is_set():
            return
        try:
            self._client.unsubscribe(self.topics.frames)
        except Exception:  # noqa: BLE001 - best effort while shutting down
            pass
        deadline = time.monotonic() + drain_timeout_s
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._worker.join(timeout=max(0.1, deadline - time.monotonic()) + 1.0)
        if self._connected.is_set():
            info = self._client.publish(self.status_topic, self._status("offline"), qos=1,
                                        retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass
        self._client.disconnect()
        self._client.loop_stop()
        if self.learner is not None:
            try:
                self.learner.checkpoint()
            finally:
                self.learner.close()
        self._write_health(force=True, state="stopped")
        log.info("stopped: %s", self.counters.as_dict())

    def run_forever(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit code."""
        stop = threading.Event()

        def _handler(signum, _frame):
            log.info("received %s, shutting down", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)
        self.start()
        while not stop.wait(0.5):
            pass
        self.stop()
        return 0

    # --- paho callbacks (network thread: never block) -------------------------

    def _on_connect(self, client, _userdata, _flags, reason_code, _props) -> None:
        if reason_code.is_failure:
            log.warning("connection refused by broker: %s", reason_code)
            return
        client.subscribe(self.topics.frames, qos=0)
        client.publish(self.status_topic, self._status("online"), qos=1, retain=True)
        self._connected.set()
        log.info("connected; subscribed to %s", self.topics.frames)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("disconnected (%s); reconnecting", reason_code)

    def _on_message(self, _client, _userdata, msg) -> None:
        self.counters.received += 1
        try:
            self._queue.put_nowait((msg.topic, msg.payload, time.monotonic()))
        except queue.Full:
            self.counters.dropped["queue_full"] += 1

    # --- worker ---------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                self._write_health()
                continue
            batch = [item]
            while len(batch) < self.config.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._process(batch)
            except Exception:  # noqa: BLE001 - the worker must survive any message
                log.exception("unexpected error while processing a batch")
                self.counters.dropped["internal_error"] += len(batch)
            self._write_health()

    def _process(self, batch: list[tuple[str, bytes, float]]) -> None:
        pending = []  # (device, window, arrival)
        for topic, payload, arrival in batch:
            try:
                device, _kind = self.topics.parse(topic)
            except ValueError as exc:
                self.counters.dropped["bad_topic"] += 1
                log.warning("%s", exc)
                continue
            try:
                frame = decode_frame(payload, max_bytes=self.config.max_payload_bytes)
                wb = self.windows.get(device)
                if frame.n_channels != wb.n_channels:
                    raise ProtocolError(
                        "bad_channels", f"frame seq={frame.seq} has {frame.n_channels} channels, "
                        f"the model expects {wb.n_channels}")
                if frame.n_samples > 4096:
                    raise ProtocolError("bad_shape", f"frame of {frame.n_samples} samples")
            except ProtocolError as exc:
                self._reject(device, topic, exc.reason, str(exc))
                continue
            except OverflowError as exc:
                self._reject(device, topic, "too_many_devices", str(exc))
                continue
            self.counters.frames += 1
            for w in wb.push(frame.seq, frame.ts, frame.values):
                pending.append((device, w, arrival))
        if not pending:
            return
        shape = self.bundle.input.shape
        x = np.stack([w.values.reshape(shape) for _, w, _ in pending])  # (B, *shape)
        self.counters.windows += len(pending)
        if self.learner is not None:
            preds = [(p.label, p.confidence, p.prob_dict(), {"decided_by": p.decided_by,
                      "novelty": p.novelty, "novelty_score": round(p.novelty_score, 6)})
                     for p in self.learner.predict_many(x)]
        else:
            probs = self.classifier.predict_proba(x)                    # (B, K)
            classes = self.bundle.classes
            preds = [(classes[int(np.argmax(p))], float(p.max()),
                      dict(zip(classes, p.tolist(), strict=True)), {}) for p in probs]
        now = time.monotonic()
        for (device, w, arrival), (label, conf, probs, extra) in zip(pending, preds, strict=True):
            topics = self.topics.for_device(device)
            payload = encode_prediction(
                device=device, window=w.index, seq_first=w.seq_first, seq_last=w.seq_last,
                ts=w.ts, label=label, confidence=conf, probs=probs,
                latency_ms=(now - arrival) * 1e3, model=self.bundle.bundle_id, **extra)
            self._client.publish(topics.predictions, payload, qos=0)
            self.counters.predictions += 1
            if extra.get("novelty"):
                self.counters.novelty += 1
                self._client.publish(topics.events, encode_event(
                    device=device, type="novelty", reason="far_from_memory",
                    detail=f"window {w.index}: cosine distance {extra['novelty_score']:.3f} to "
                    "the nearest stored episode", ts=time.time(), window=w.index,
                    score=extra["novelty_score"]), qos=0)

    def _reject(self, device: str, topic: str, reason: str, detail: str) -> None:
        self.counters.dropped[reason] += 1
        log.warning("rejected message on %s: %s", topic, detail)
        self._client.publish(
            self.topics.for_device(device).events,
            encode_event(device=device, type="error", reason=reason, detail=detail,
                         ts=time.time(), topic=topic), qos=0)

    # --- status and health --------------------------------------------------------

    def _status(self, state: str) -> bytes:
        return encode_status(
            state=state, agent=self.config.status_owner, version=__version__,
            model=self.bundle.bundle_id, classes=list(self.bundle.classes), ts=time.time(),
            counters=self.counters.as_dict())

    def _write_health(self, force: bool = False, state: str = "running") -> None:
        path = self.config.health_file
        now = time.time()
        if path is None or (not force and now - self._last_health < self.config.health_interval_s):
            return
        self._last_health = now
        body = {"ts": now, "pid": os.getpid(), "state": state,
                "connected": self._connected.is_set(), "counters": self.counters.as_dict()}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".health-")
        with os.fdopen(fd, "w") as f:
            json.dump(body, f)
        os.replace(tmp, path)


def check_health(path: Path, max_age_s: float) -> tuple[bool, str]:
    """Read the daemon's health file: healthy when fresh, running and connected."""
    try:
        body = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return False, f"cannot read health file {path}: {exc}"
    age = time.time() - float(body.get("ts", 0))
    if body.get("state") != "running":
        return False, f"daemon state is {body.get('state')!r}"
    if age > max_age_s:
        return False, f"health file is {age:.0f} s old (max {max_age_s:.0f} s): daemon stalled"
    if not body.get("connected"):
        return False, "daemon is not connected to the broker"
    return True, f"ok ({age:.1f} s ago, counters {body.get('counters')})"
