"""The daemon's worker: frames -> windows -> predictions, labels -> learning, commands.

One thread owns everything here (windows, history, the learners' writes), so none of it
needs a lock; paho's network thread only enqueues (agent/daemon.py). Per loop:

1. take up to ``max_batch`` frames from the bounded frame queue, decode and window them,
   run the encoder once on every window completed, predict per learner, publish;
2. take every queued label and command (QoS 1, unbounded here because the broker's
   in-flight window — MQTT 5 Receive Maximum — bounds them) and handle them;
3. retry labels waiting for windows that had not arrived yet;
4. ask the sleep scheduler whether to start or stop a sleep.

A label is acknowledged (PUBACK) only after every window it names was learned, i.e. is in
the learner's write-ahead log; a label that can never be learned (malformed, unknown
window) is acknowledged with an error event, so the broker does not redeliver it forever.
A label whose learning failed (e.g. the disk is full) is not acknowledged: the broker
redelivers it on the next connection, and the label key makes redelivery idempotent.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from agent.errors import InputError, ProtocolError, ReverieError
from agent.messages import CommandMsg, LabelMsg, decode_command, decode_label, encode_reply
from agent.protocol import decode_frame, encode_prediction

log = logging.getLogger("reverie.worker")
MAX_PENDING = 4096        # labels waiting for windows (or for a failed learn to be retried)
LEARN_RETRY_S = 5.0
MAX_REPLIES = 256         # command replies remembered to answer a redelivery without re-running


@dataclass
class Inbound:
    kind: str            # "frames" | "labels" | "cmd"
    device: str
    topic: str
    payload: bytes
    arrival: float       # time.monotonic() when paho handed it over
    mid: int = 0
    qos: int = 0
    gen: int = 0         # connection generation it arrived on (acks are per connection)
    properties: object = None


@dataclass
class _Pending:
    msg: Inbound
    label: LabelMsg
    deadline: float
    learned: set = field(default_factory=set)
    retry_at: float = 0.0        # a failed learn (e.g. disk full) is retried, not dropped


class Worker:
    """See the module docstring; `daemon` supplies config, learners, outbox and metrics."""

    def __init__(self, daemon):
        self.d = daemon
        self.cfg = daemon.config
        self.pending: deque[_Pending] = deque()
        self.replies: dict[tuple[str, str], tuple[bool, dict]] = {}
        self.last_beat = time.monotonic()

    # ------------------------------------------------------------------ frames

    def process_frames(self, batch: list[Inbound]) -> None:
        d, m = self.d, self.d.metrics
        shape = d.bundle.input.shape
        spec_c = d.bundle.input.n_channels
        pending = []   # (device, window, arrival)
        for msg in batch:
            try:
                frame = decode_frame(msg.payload, max_bytes=self.cfg.ingest.max_payload_bytes)
                if frame.n_channels != spec_c:
                    raise ProtocolError(
                        "bad_channels", f"frame seq={frame.seq} has {frame.n_channels} "
                        f"channels, the model expects {spec_c}")
                wb = d.windows.get(msg.device)
            except ProtocolError as exc:
                self.reject(msg, exc.reason, str(exc))
                continue
            except OverflowError as exc:
                self.reject(msg, "too_many_devices", str(exc))
                continue
            m.frames.inc()
            c = wb.counters
            before = (c.reordered, c.gaps, c.duplicates)
            for w in wb.push(frame.seq, frame.ts, frame.values):
                pending.append((msg.device, w, msg.arrival))
            if (c.reordered, c.gaps, c.duplicates) != before:
                m.frames_reordered.inc(c.reordered - before[0])
                m.frame_gaps.inc(c.gaps - before[1])
                m.frames_duplicate.inc(c.duplicates - before[2])
        if batch:
            d.scheduler.on_frames(len(batch))
        if not pending:
            return
        t0 = time.perf_counter()
        x = np.stack([w.values.reshape(shape) for _, w, _ in pending])   # (B, *shape)
        m.windows.inc(len(pending))
        if d.encoder is None:                           # a whole-model bundle: predict only
            preds = d.classify(x)
        else:
            latents = d.encoder.encode(x)               # (B, d): once for every learner
            preds = [None] * len(pending)
            groups: dict[int, tuple[object, list[int]]] = {}
            refused: dict[str, str] = {}
            for i, (device, _w, _a) in enumerate(pending):
                if device in refused:
                    continue
                try:
                    learner = d.learner_for(device)
                except OverflowError as exc:      # per-device learners: too many devices
                    refused[device] = str(exc)
                    continue
                groups.setdefault(id(learner), (learner, []))[1].append(i)
            for device, why in refused.items():
                self.reject_device(device, "too_many_devices", why)
            for learner, rows in groups.values():
                for i, p in zip(rows, learner.predict_latents(latents[rows]), strict=True):
                    preds[i] = (p.label, p.confidence, p.prob_dict(), {
                        "decided_by": p.decided_by, "novelty": p.novelty,
                        "novelty_score": round(p.novelty_score, 6)})
            by_device: dict[str, list[int]] = {}
            for i, (device, _w, _a) in enumerate(pending):
                by_device.setdefault(device, []).append(i)
            for device, rows in by_device.items():
                if device in refused:
                    continue
                ws = [pending[i][1] for i in rows]
                d.history.add(device, np.array([w.index for w in ws], np.int64),
                              np.array([w.ts for w in ws], np.float64), latents[rows])
        m.inference_batch_seconds.observe(time.perf_counter() - t0)
        now = time.monotonic()
        for (device, w, arrival), pred in zip(pending, preds, strict=True):
            if pred is None:              # its device was refused above
                continue
            label, conf, probs, extra = pred
            topics = d.topics.for_device(device)
            latency = now - arrival
            d.outbox.publish(topics.predictions, encode_prediction(
                device=device, window=w.index, seq_first=w.seq_first, seq_last=w.seq_last,
                ts=w.ts, label=label, confidence=conf, probs=probs, latency_ms=latency * 1e3,
                model=d.bundle.bundle_id, **extra))
            m.predictions.inc()
            m.frame_to_prediction_seconds.observe(latency)
            if extra.get("novelty"):
                m.novelty.inc()
                d.publish_event(
                    device, type="novelty", reason="far_from_memory",
                    detail=f"window {w.index}: cosine distance {extra['novelty_score']:.3f} "
                    "to the nearest stored episode", window=w.index,
                    score=extra["novelty_score"])

    # ------------------------------------------------------------------ labels

    def process_label(self, msg: Inbound) -> None:
        d = self.d
        try:
            label = decode_label(msg.payload, max_bytes=self.cfg.ingest.max_payload_bytes)
        except ProtocolError as exc:
            self.reject(msg, exc.reason, str(exc))
            d.ack(msg)
            return
        if d.encoder is None:
            self.reject(msg, "not_learning", "this bundle has no encoder/head split: the agent "
                        "predicts but cannot learn (re-export the bundle)")
            d.ack(msg)
            return
        item = _Pending(msg, label, time.monotonic() + self.cfg.ingest.label_wait_s)
        if not self._try_label(item, final=False):
            if len(self.pending) >= MAX_PENDING:
                self.reject(msg, "busy", f"label {label.id!r}: {MAX_PENDING} labels already "
                            "wait for their windows")
                d.ack(msg)
                return
            self.pending.append(item)

    def retry_pending(self) -> None:
        now = time.monotonic()
        for _ in range(len(self.pending)):
            item = self.pending.popleft()
            if now < item.retry_at or not self._try_label(item, final=now >= item.deadline):
                self.pending.append(item)

    def _try_label(self, item: _Pending, *, final: bool) -> bool:
        """Learn what the label names; False to wait for windows not produced yet."""
        d, msg, lab = self.d, item.msg, item.label
        device = msg.device
        key = f"{device}/{lab.id}"
        targets: list[tuple[str, np.ndarray, float]] = []   # (key, latent, ts)
        missing: list[int] = []
        if lab.values is not None:
            spec = d.bundle.input
            if lab.values.shape != (spec.window_samples, spec.n_channels):
                self.reject(msg, "bad_shape", f"label {lab.id!r}: values are "
                            f"{lab.values.shape[0]}x{lab.values.shape[1]}, the model takes a "
                            f"window of {spec.window_samples}x{spec.n_channels} "
                            "(samples x channels)")
                d.ack(msg)
                return True
            h = d.encoder.encode(np.ascontiguousarray(lab.values.T).reshape(1, *spec.shape))[0]
            targets.append((key, h, lab.ts if lab.ts is not None else time.time()))
        elif lab.windows:
            found, lat, missing, ts = d.history.by_ids(device, lab.windows, with_ts=True)
            ahead = [w for w in missing if w >= d.windows.next_index(device)]
            if ahead and not final:
                return False
            targets = [(f"{key}/{int(w)}", h, float(t))
                       for w, h, t in zip(found.tolist(), lat, ts.tolist(), strict=True)]
        else:
            span = d.history.time_span(device)
            if (span is None or span[1] < lab.to_ts) and not final:
                return False
            ids, ts, lat = d.history.by_time(device, lab.from_ts, lab.to_ts)
            targets = [(f"{key}/{int(w)}", h, float(t))
                       for w, t, h in zip(ids.tolist(), ts.tolist(), lat, strict=True)]
            if not targets:
                held = "none" if span is None else f"{span[0]:.3f}..{span[1]:.3f}"
                self.reject(msg, "unknown_window", f"label {lab.id!r}: no window of device "
                            f"{device} starts in [{lab.from_ts}, {lab.to_ts}] (history holds "
                            f"{held})")
                d.ack(msg)
                return True
        stored = dup = 0
        new_class = False
        try:
            learner = d.learner_for(device) if targets else None
        except OverflowError as exc:
            self.reject(msg, "too_many_devices", str(exc))
            d.ack(msg)
            return True
        try:
            for k, h, ts in targets:
                if k in item.learned:
                    continue
                r = learner.learn_latent(h, lab.label, ts=ts, key=k)
                item.learned.add(k)
                stored += r.stored
                dup += r.duplicate
                new_class |= r.new_class
        except InputError as exc:
            self.reject(msg, "bad_label", f"label {lab.id!r}: {exc}")
            d.ack(msg)
            return True
        except (ReverieError, OSError) as exc:
            # Not acknowledged: retried here every few seconds (the windows learned so far
            # are remembered), and redelivered by the broker if the agent stops meanwhile.
            log.error("label %r of %s not learned, retrying in %.0f s: %s", lab.id, device,
                      LEARN_RETRY_S, exc)
            self.reject(msg, "learn_failed", f"label {lab.id!r}: {exc} (retrying)")
            item.retry_at = time.monotonic() + LEARN_RETRY_S
            item.deadline = max(item.deadline, item.retry_at)
            return False
        if missing:
            self.reject(msg, "unknown_window", f"label {lab.id!r}: window(s) {missing[:20]} "
                        f"of device {device} are not in the history (last "
                        f"{self.cfg.ingest.history_windows} windows kept)")
        d.ack(msg)
        if not targets:
            return True
        m = d.metrics
        if dup == len(targets):
            m.labels_duplicate.inc()
        else:
            m.labels_learned.inc()
        m.label_ack_seconds.observe(time.monotonic() - msg.arrival)
        d.publish_event(
            device, type="label", reason="duplicate" if dup == len(targets) else "learned",
            detail=f"label {lab.id!r} = {lab.label!r}: {len(targets)} window(s), {stored} "
            "stored", id=lab.id, label=lab.label, windows=len(targets), stored=stored,
            new_class=new_class, duplicates=dup)
        if new_class:
            d.status_changed()
        return True

    # ------------------------------------------------------------------ commands

    def process_command(self, msg: Inbound) -> None:
        d = self.d
        try:
            cmd = decode_command(msg.payload)
        except ProtocolError as exc:
            self.reject(msg, exc.reason, str(exc))
            self.reply(msg, CommandMsg("", "?"), False, error=str(exc), reason=exc.reason)
            d.ack(msg)
            return
        key = (msg.device, cmd.id)
        if cmd.id and key in self.replies:        # a redelivery: answer again, do not re-run
            ok, result = self.replies[key]
            self.reply(msg, cmd, ok, duplicate=True, **result)
            d.ack(msg)
            return
        try:
            ok, result = True, self._run_command(msg.device, cmd)
        except PermissionError as exc:
            self.reject(msg, "not_authorized", str(exc))
            ok, result = False, {"error": str(exc), "reason": "not_authorized"}
        except (ReverieError, OSError, ValueError, OverflowError) as exc:
            ok, result = False, {"error": str(exc)}
        if cmd.id:
            self.replies[key] = (ok, result)
            while len(self.replies) > MAX_REPLIES:
                self.replies.pop(next(iter(self.replies)))
        self.reply(msg, cmd, ok, **result)
        d.ack(msg)

    def _authorize(self, device: str, cmd: CommandMsg) -> None:
        """State-changing commands: only on the allowed topics, and signed when a key is
        configured (commands.from, commands.key_file; docs/operations.md, Security)."""
        cfg = self.cfg
        if not cmd.changes_state:
            return
        if cfg.commands_from == "agent" and device != cfg.status_owner:
            raise PermissionError(f"{cmd.cmd!r} is accepted only on the agent's own topic "
                                  f"{self.d.own_topics.cmd} (commands.from = \"agent\")")
        key = self.d.command_key
        if key is None:
            return
        import hmac

        if cmd.sig is None or cmd.ts is None or not cmd.id:
            raise PermissionError(f"{cmd.cmd!r} must be signed: id, ts and sig "
                                  "(commands.key_file is set)")
        want = hmac.new(key, cmd.signed_bytes, "sha256").hexdigest()
        if not hmac.compare_digest(want, cmd.sig):
            raise PermissionError(f"{cmd.cmd!r}: bad signature")
        age = time.time() - cmd.ts
        if abs(age) > cfg.commands_max_age_s:
            raise PermissionError(f"{cmd.cmd!r}: ts is {age:.0f} s off the agent's clock "
                                  f"(commands.max_age_s = {cfg.commands_max_age_s:g})")

    def _run_command(self, device: str, cmd: CommandMsg) -> dict:
        d = self.d
        self._authorize(device, cmd)
        if cmd.cmd == "status":
            return {"status": d.status_body("online")}
        if cmd.cmd == "sleep":
            if d.encoder is None:
                raise InputError("this bundle cannot learn, so it cannot sleep")
            if d.sleeper.sleeping:
                return {"scheduled": False, "sleeping": True}
            if not d.config.sleep.enabled:
                raise InputError("sleep.enabled = false: sleeps are turned off")
            d.scheduler.request("command")
            d.sleep_budget_override = cmd.budget_s
            return {"scheduled": True, "sleeping": False}
        if cmd.cmd == "snapshot":
            return {"checkpoints": d.checkpoint_all()}
        if cmd.cmd == "rollback":
            if d.encoder is None:
                raise InputError("this bundle has no adapters to roll back")
            learner = d.learner_for(device)
            version = learner.rollback_adapter(cmd.to_version)
            d.status_changed()
            return {"adapter_version": version}
        raise InputError(f"unknown command {cmd.cmd!r}")

    def reply(self, msg: Inbound, cmd: CommandMsg, ok: bool, **result) -> None:
        d = self.d
        props = msg.properties
        topic = getattr(props, "ResponseTopic", None) if props is not None else None
        out_props = None
        if topic and ("+" in topic or "#" in topic):
            topic = None
        if topic:
            corr = getattr(props, "CorrelationData", None)
            if corr is not None:
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                out_props = Properties(PacketTypes.PUBLISH)
                out_props.CorrelationData = corr
        else:
            topic = d.topics.for_device(msg.device).replies
        d.outbox.publish(topic, encode_reply(id=cmd.id, cmd=cmd.cmd, ok=ok, ts=time.time(),
                                             **result), qos=1, properties=out_props)

    # ------------------------------------------------------------------ errors

    def reject_device(self, device: str, reason: str, detail: str) -> None:
        self.d.metrics.dropped.inc(reason=reason)
        log.warning("device %s: %s", device, detail)
        self.d.publish_event(device, type="error", reason=reason, detail=detail)

    def reject(self, msg: Inbound, reason: str, detail: str, *, count: bool = True) -> None:
        if count:
            self.d.metrics.dropped.inc(reason=reason)
        log.warning("rejected message on %s: %s", msg.topic, detail)
        self.d.publish_event(msg.device, type="error", reason=reason, detail=detail,
                             topic=msg.topic)
