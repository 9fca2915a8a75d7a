"""The agent daemon (`reverie run`): learning from MQTT streams on the device.

Threads:
* paho's network thread only enqueues: frames into a bounded queue (full: dropped and
  counted, never blocking the network), labels and commands (QoS 1) into a control queue
  that the broker's in-flight window bounds (MQTT 5 Receive Maximum).
* the worker (agent/worker.py) windows, predicts, learns, answers commands and asks the
  sleep scheduler when to sleep.
* the sleeper (agent/sleeper.py) consolidates, off the ingest path.
* the main thread: signals, periodic checkpoints and status, health file, systemd
  watchdog (only while the worker shows progress), metrics server.

Durability: the MQTT session is persistent (a stable client id; MQTT 5 session expiry,
or clean session off on 3.1.1), labels are acknowledged only once learned into the
write-ahead log, so labels published while the agent is down or crashing are delivered
and learned after it restarts; deduplication by label key makes redelivery harmless.

Shutdown (SIGTERM/SIGINT): stop ingest, finish what is queued (bounded), preempt a
running sleep, checkpoint, publish the retained "offline" status, disconnect; well
inside Docker's 10 s.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from agent import numba_cache, startup  # noqa: F401 - numba_cache first: a private kernel cache
from agent.bundle import Bundle, load_bundle
from agent.commands import MAX_COMMAND_BYTES, CommandAuth, Commands
from agent.config import AgentConfig
from agent.daemon_mqtt import _WAKE, PACKET_OVERHEAD, ByteBudget, ConnectionReport, MqttCallbacks
from agent.errors import ConfigError, ReverieError
from agent.history import WindowHistory
from agent.history_store import HistoryStore
from agent.inference import Classifier, Encoder
from agent.learner import Learner, LearnerConfig
from agent.learners import Learners
from agent.metrics import MetricsServer, Registry, daemon_metrics
from agent.mqtt import connect_properties, make_client
from agent.outbox import Outbox
from agent.persist.nonces import NonceStore
from agent.protocol import encode_event, encode_status
from agent.scheduler import SleepScheduler
from agent.sdnotify import SystemdNotifier
from agent.sleeper import Sleeper
from agent.status import StatusMixin, check_health  # noqa: F401 - check_health: public here
from agent.topics import INBOUND, WILDCARD_DEVICE, Topics
from agent.value_range import ValueRange
from agent.windowing import DeviceWindows
from agent.worker import Inbound, Worker

log = logging.getLogger("reverie.daemon")
RECEIVE_MAXIMUM = 64          # QoS 1 labels/commands in flight to us (MQTT 5)
STATUS_INTERVAL_S = 30.0
IDLE_WAIT_S = 0.25            # the worker's longest sleep with nothing to do (scheduler polls)
CRASH_ID_GAP = 1_000_000      # window ids skipped after an unclean stop (see Daemon.__init__)
HISTORY_SAVE_S = 10.0         # the window history is saved this often when it changed
NONCE_FILE = "command_nonces"  # signed commands' nonces (agent/persist/nonces.py)
CONTROL_PER_LOOP = 32         # labels/commands handled per worker iteration (frames go on)


class Daemon(StatusMixin, MqttCallbacks):
    def __init__(self, config: AgentConfig, *, env=os.environ):
        self.config = config
        self.bundle: Bundle = load_bundle(config.bundle, public_keys=config.public_keys or None)
        if self.bundle.signed_by:
            log.info("bundle %s: signature verified (key %s)", self.bundle.bundle_id,
                     self.bundle.signed_by)
        self.registry = Registry()
        self.metrics = daemon_metrics(self.registry)
        fresh = config.state_dir is None or not config.state_dir.is_dir() or not any(
            p.name not in startup.OWN_FILES for p in config.state_dir.iterdir())  # before the learners write
        if config.state_dir is not None:
            startup.prepare_state_root(config.state_dir)
            startup.check_rollback(config.state_dir, self.bundle,
                                   allow=config.allow_bundle_rollback)
        self.client_id = startup.client_id(config)
        # A split bundle (encoder.onnx + head.npz) gets the full learner; an older
        # whole-model bundle only predicts.
        self.encoder: Encoder | None = None
        self.classifier: Classifier | None = None
        self.pool: Learners | None = None
        # durable=False: the worker fsyncs once per label message (group commit), not once
        # per window, before it acknowledges the label (agent/worker.py).
        self._learner_cfg = LearnerConfig(threads=config.threads, durable=False)
        if "encoder" in self.bundle.manifest:
            self.encoder = Encoder(self.bundle, threads=config.threads)
            per_device = config.learner_mode == "per_device" and config.device_id == WILDCARD_DEVICE
            self.pool = Learners(
                lambda state: Learner(self.bundle, self._learner_cfg, state_dir=state,
                                      encoder=self.encoder),
                per_device=per_device, state_dir=config.state_dir, owner=config.status_owner,
                max_learners=config.max_learners, allowed=config.learner_devices,
                on_new=self.status_changed)
        else:
            self.classifier = Classifier(self.bundle, threads=config.threads)
        self.value_range = ValueRange.from_manifest(
            self.bundle.manifest, self.bundle.input.n_channels,
            k=config.ingest.value_range_k, max_abs=config.ingest.max_abs_value)
        spec = self.bundle.input
        ing = config.ingest
        self.windows = DeviceWindows(spec.n_channels, spec.window_samples,
                                     ing.hop or spec.window_samples,
                                     max_devices=ing.max_devices,
                                     reorder_frames=ing.reorder_frames)
        dim = self.encoder.latent_dim if self.encoder is not None else 1
        # The window history is kept incrementally (agent/history_store.py) when there is
        # a state directory and something to learn.
        self.history_store = (HistoryStore(config.state_dir, self.bundle.bundle_id)
                              if config.state_dir and self.encoder is not None else None)
        self.history = (self.history_store.load(ing.history_windows, dim)
                        if self.history_store else WindowHistory(ing.history_windows, dim))
        # Window ids never repeat across restarts: labels name windows by id. After a crash
        # the ids handed out since the last history save are unknown, so skip past them.
        crashed = not fresh and not (self.history.clean and self.history_store is not None
                                     and self.history_store.snapshot_path.exists())
        gap = CRASH_ID_GAP if crashed else 0
        if crashed:
            log.warning("the last run did not stop cleanly: window ids continue %d higher "
                        "(labels for windows after the last history save are unknown)", gap)
        self.windows.default_start = gap
        for device in self.history.devices():
            self.windows.set_start_index(device, self.history.last_index(device) + 1 + gap)
        if self.history_store is not None:
            try:
                self.history_store.mark_open()
            except (ReverieError, OSError) as exc:
                log.warning("cannot mark the window history open: %s", exc)
            self.history.journal = []
        self.topics = config.topics
        self.command_key = _read_key(config.commands_key_file)
        self.own_topics = Topics(config.status_owner, config.prefix)
        for line in startup.insecure_defaults(config, self.bundle,
                                              command_key=self.command_key is not None):
            log.warning("insecure: %s", line)
        if self.command_key is not None and config.state_dir is None:
            log.warning("insecure: commands.key_file without agent.state_dir: command nonces "
                        "are kept in memory only, so a signed command can be replayed after "
                        "a restart (within commands.max_age_s)")
        self.scheduler = SleepScheduler(config.sleep)
        self.sleeper = Sleeper(self)
        self.sleep_budget_override: float | None = None
        self.notifier = SystemdNotifier(env)
        self._frames: queue.Queue = queue.Queue(maxsize=ing.queue_size)
        self._control: deque[Inbound] = deque()
        self.queued_bytes = ByteBudget(ing.max_queue_bytes)
        self._stop = threading.Event()
        self._closed = threading.Event()           # ingest closed: drop what still arrives
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._sub_mid = -1
        self._gen = 0
        self._lock = threading.Lock()
        self._status_dirty = threading.Event()
        self.worker = Worker(self)
        self.commands = Commands(self, CommandAuth(
            key=self.command_key, commands_from=config.commands_from,
            own_cmd_topic=self.own_topics.cmd, agent=config.status_owner,
            max_age_s=config.commands_max_age_s,
            nonces=NonceStore(config.state_dir / NONCE_FILE if config.state_dir else None)))
        self._worker = threading.Thread(target=self._work, name="reverie-worker", daemon=True)
        persistent = config.broker.session_expiry_s > 0
        self._client = make_client(config.broker.url, client_id=self.client_id,
                                   protocol=config.broker.protocol, clean_start=not persistent,
                                   tls=config.broker.tls, manual_ack=True)
        self._client.will_set(self.own_topics.status, encode_status(state="offline",
                              agent=config.status_owner), qos=1, retain=True)
        self._client.reconnect_delay_set(min_delay=config.broker.reconnect_min_s,
                                         max_delay=config.broker.reconnect_max_s)
        self._client.max_queued_messages_set(config.broker.outbox_max)
        self.conn_report = ConnectionReport(config.broker.url, config.broker.protocol,
                                            backoff_max_s=config.broker.reconnect_max_s)
        self._connack = False
        self._client.on_pre_connect = self._on_pre_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.suppress_exceptions = True   # a callback bug must not kill the network thread
        self.outbox = Outbox(self._client, config.broker.outbox_max,
                             on_drop=self.metrics.outbox_dropped.inc)
        self._metrics_server = (MetricsServer(self.registry, config.metrics_listen)
                                if config.metrics_listen else None)
        self.metrics.memory_capacity.set(self._learner_cfg.capacity)
        # Bound once: the network thread increments these for every message.
        self._received = {k: self.metrics.messages_received.labels(kind=k)
                          for k in INBOUND}
        self._queue_full = self.metrics.dropped.labels(reason="queue_full")
        self._last_health = 0.0
        self._last_poll = 0.0
        self._last_watchdog = 0.0
        self._last_history_save = time.monotonic()
        self._stopping = False
        self._connects = 0
        self.started_at = time.time()

    # ------------------------------------------------------------------ learners

    def learner_for(self, device: str) -> Learner | None:
        """The learner learning for `device` (None for a predict-only bundle); raises
        `NoLearner` when the device gets none (agent.max_learners, learner_devices)."""
        return None if self.pool is None else self.pool.for_device(device)

    def learners(self) -> list[tuple[str, Learner]]:
        return [] if self.pool is None else self.pool.items()

    def classify(self, x: np.ndarray) -> list[tuple]:
        probs = self.classifier.predict_proba(x)
        classes = self.bundle.classes
        return [(classes[int(np.argmax(p))], float(p.max()),
                 dict(zip(classes, p.tolist(), strict=True)), {}) for p in probs]

    def checkpoint_all(self) -> dict[str, int | None]:
        out = {} if self.pool is None else self.pool.checkpoint()
        self._save_history()
        return out

    def _save_history(self, clean: bool = False) -> None:
        """Write the window history's snapshot now (a snapshot command; ``clean``: the
        final save of a clean stop). The worker thread, or the main one once the worker
        has stopped."""
        if self.history_store is None:
            return
        try:
            self.history_store.hand_off(self.history, clean=clean, force_snapshot=True)
            self.history_store.write()
        except (OSError, ValueError, ReverieError) as exc:
            log.warning("cannot save the window history: %s", exc)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        c = self.config.broker
        log.info("connecting to %s as %s (client id %s, bundle %s, classes %s)", c.url,
                 self.own_topics.status, self.client_id, self.bundle.bundle_id,
                 ",".join(self.bundle.classes))
        if self._metrics_server is not None:
            self._metrics_server.start()
            log.info("metrics on http://%s:%d/metrics", *self._metrics_server.address)
        self._worker.start()
        # MQTT 5 Maximum Packet Size: the broker drops what we would refuse anyway instead
        # of sending it (a 48 MiB frame never reaches this process).
        props = connect_properties(
            c.protocol, c.session_expiry_s, RECEIVE_MAXIMUM,
            max(self.config.ingest.max_payload_bytes, MAX_COMMAND_BYTES) + PACKET_OVERHEAD)
        kw = {"clean_start": c.session_expiry_s <= 0, "properties": props} \
            if c.protocol == "5" else {}
        self._client.connect_async(c.url.host, c.url.port, keepalive=c.keepalive_s, **kw)
        self._client.loop_start()
        # Everything built so far (models, sessions, the memory's objects) lives as long as
        # the process: keep the cyclic GC from rescanning it (shorter GC pauses in the worker).
        gc.collect()
        gc.freeze()
        self.notifier.ready(f"serving {self.topics.frames}")

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected and subscribed (SUBACK received)."""
        return self._subscribed.wait(timeout)

    def stop(self, drain_timeout_s: float = 3.0) -> None:
        """Stop ingest, drain, preempt sleep, checkpoint, publish "offline", disconnect."""
        if self._stop.is_set():
            return
        t0 = time.monotonic()
        self._stopping = True
        self.notifier.stopping()
        try:   # frames only: label/cmd subscriptions stay in the persistent session
            self._client.unsubscribe(self.topics.frames)
        except Exception:  # noqa: BLE001 - best effort while shutting down
            pass
        self.sleeper.preempt()
        deadline = t0 + drain_timeout_s
        while (not self._frames.empty() or self._control) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._closed.set()
        self._stop.set()
        self._worker.join(timeout=max(0.1, deadline - time.monotonic()) + 1.0)
        self.sleeper.preempt()
        self.sleeper.join(timeout=2.0)
        busy = self._worker.is_alive() or self.sleeper.sleeping
        if not self._worker.is_alive():
            self._save_history(clean=True)      # first: it is what keeps window ids unique
            if self.history_store is not None:
                self.history_store.close()
        try:
            if self.pool is not None:
                self.pool.checkpoint(changed_only=True)
        except Exception:  # noqa: BLE001 - still publish offline and disconnect
            log.exception("final checkpoint failed")
        if self._connected.is_set():
            info = self._client.publish(self.own_topics.status, self.status_body_bytes("offline"),
                                        qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass
        self._client.disconnect()
        self._client.loop_stop()
        if not busy and self.pool is not None:   # a thread inside a learner: leave it to the OS
            self.pool.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        self._write_health(force=True, state="stopped")
        log.info("stopped in %.2f s: %s", time.monotonic() - t0, self.counters())

    def run_forever(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit code."""
        stop = threading.Event()

        def _handler(signum, _frame):
            log.info("received %s, shutting down", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)
        self.start()
        self._last_ck = self._last_status = time.monotonic()
        while not stop.wait(0.25):
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the main loop must survive; stop() must run
                log.exception("main loop")
        self.stop()
        return 0

    def _tick(self) -> None:
        """The main thread's periodic duties (every 0.25 s)."""
        now = time.monotonic()
        if not self._connected.is_set() and (line := self.conn_report.silent(
                self._client.socket() is not None)) is not None:
            log.warning("%s", line)
        wd = self.notifier.watchdog_interval_s     # None: no systemd watchdog for us
        if wd is not None and now - self._last_watchdog >= wd \
                and now - self.worker.last_beat < 10.0:   # only while the worker loops
            self._last_watchdog = now
            self.notifier.watchdog()
        self._write_health()
        self._update_gauges()
        if self._connected.is_set() and (self._status_dirty.is_set()
                                         or now - self._last_status >= STATUS_INTERVAL_S):
            self._last_status = now
            self._status_dirty.clear()
            self._client.publish(self.own_topics.status, self.status_body_bytes("online"),
                                 qos=1, retain=True)
        self.outbox.flush()
        self._write_history_snapshot()
        if now - self._last_ck >= self.config.checkpoint_interval_s:
            self._last_ck = now
            try:       # only learners whose state changed: an idle gateway writes nothing
                if self.pool is not None:
                    self.pool.checkpoint(changed_only=True)
            except Exception:  # noqa: BLE001 - keep serving; the WAL still holds it all
                log.exception("periodic checkpoint failed")

    # ------------------------------------------------------------------ worker loop

    def _work(self) -> None:
        w = self.worker
        max_batch = self.config.ingest.max_batch
        budget_s = self.config.ingest.loop_budget_s
        while not self._stop.is_set():
            w.last_beat = time.monotonic()
            batch: list[Inbound] = []
            idle_wait = 0.02 if (w.pending or self._control) else IDLE_WAIT_S
            try:
                batch.append(self._frames.get(timeout=idle_wait))
            except queue.Empty:
                pass
            while batch and len(batch) < max_batch:
                try:
                    batch.append(self._frames.get_nowait())
                except queue.Empty:
                    break
            batch = [b for b in batch if b is not _WAKE]
            self.queued_bytes.release(sum(len(b.payload) for b in batch))
            self._guard(w.process_frames, batch)
            # Labels and commands get at most ingest.loop_budget_s per loop (a label naming
            # 1,024 windows is learned over several loops): frames keep flowing and the
            # loop keeps beating for the watchdog.
            w.budget_ends = time.monotonic() + budget_s
            for i in range(min(len(self._control), CONTROL_PER_LOOP)):
                if i and w.over_budget():        # at least one per loop: always progress
                    break
                item = self._control.popleft()
                self.queued_bytes.release(len(item.payload))
                if not self._guard(w.process_label if item.kind == "labels"
                                   else w.process_command, item):
                    # a bug, not the message's fault: report it and do not let the broker
                    # redeliver it forever (it would fill the in-flight window)
                    w.reject(item, "internal_error", f"{item.kind} message could not be "
                             "handled (a bug: see the agent's log)", count=False)
                    self.ack(item)
            if w.pending:
                self._guard(w.retry_pending)
            self._guard(self._poll_sleep)
            self._guard(self._save_history_if_due)
            self.metrics.queue_depth.set(self._frames.qsize())

    def _guard(self, fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception:  # noqa: BLE001 - the worker must survive any message
            log.exception("unexpected error in %s", getattr(fn, "__name__", fn))
            self.metrics.dropped.inc(reason="internal_error")
            return False

    def _save_history_if_due(self) -> None:
        """Worker thread: hand the new windows over now and then; the main thread appends
        them to the history log (a write + fsync would stall predictions)."""
        now = time.monotonic()
        if (self.history_store is not None and self.history.dirty
                and now - self._last_history_save >= HISTORY_SAVE_S):
            self._last_history_save = now
            self.history.dirty = False
            self.history_store.hand_off(self.history)

    def _write_history_snapshot(self) -> None:
        """Main thread: append (and now and then compact) what the worker handed over."""
        if self.history_store is not None:
            try:
                self.history_store.write()
            except (OSError, ReverieError) as exc:
                log.warning("cannot save the window history: %s", exc)

    def _poll_sleep(self) -> None:
        now = time.monotonic()
        if self.encoder is None or self._stopping or now - self._last_poll < 0.2:
            return
        self._last_poll = now
        sleeping = self.sleeper.sleeping
        decision = self.scheduler.poll(sleeping=sleeping,
                                       new_episodes=self.sleeper.new_episodes())
        if decision.action == "start" and not sleeping:
            budget = self.sleep_budget_override or self.config.sleep.budget_s
            self.sleep_budget_override = None
            self.scheduler.sleep_started(decision.reason)
            self.sleeper.start(decision.reason, budget)
        elif decision.action == "stop" and sleeping:
            log.info("sleep preempted: %s", decision.reason)
            self.sleeper.preempt()

    # ------------------------------------------------------------------ status, events

    def publish_event(self, device: str, *, type: str, reason: str, detail: str, **extra) -> None:
        self.outbox.publish(self.topics.for_device(device).events, encode_event(
            device=device, type=type, reason=reason, detail=detail, ts=time.time(), **extra))

    def status_changed(self) -> None:
        self._status_dirty.set()


def _read_key(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"commands.key_file={str(path)!r}: {exc}") from None
    if len(key) < 16:
        raise ConfigError(f"commands.key_file={str(path)!r}: {len(key)} bytes, expected a "
                          "key of at least 16 bytes")
    return key


def run_daemon(config: AgentConfig) -> int:
    """`reverie run`: build the daemon from a validated config and serve until SIGTERM."""
    if config.state_dir is not None:
        startup.prepare_state_root(config.state_dir)      # 0700, parents too
    return Daemon(config).run_forever()
