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
from agent.learners import NoLearner
from agent.messages import LabelMsg, decode_label
from agent.protocol import decode_frame, encode_prediction
from agent.ratelimit import Throttle

log = logging.getLogger("reverie.worker")
MAX_PENDING = 4096        # labels waiting for windows (or for a failed learn to be retried)
LEARN_RETRY_S = 5.0
FRAME_REPORT_S = 10.0     # refused or duplicate frames: one line (and event) per device and reason this often


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
    size: int = -1       # the payload's size as received (an oversized payload is not kept)

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = len(self.payload)

    def refuse_oversized(self, what: str, max_bytes: int) -> None:
        """ProtocolError("oversized") when the payload as received exceeded `max_bytes`."""
        if self.size > max_bytes:
            raise ProtocolError("oversized", f"{what} of {self.size} bytes exceeds "
                                f"max_bytes={max_bytes}")


@dataclass
class _Pending:
    msg: Inbound
    label: LabelMsg
    deadline: float
    learned: dict = field(default_factory=dict)   # keys learned so far (in order)
    retry_at: float = 0.0        # a failed learn (e.g. disk full) is retried, not dropped
    stored: int = 0
    dup: int = 0
    new_class: bool = False


class Worker:
    """See the module docstring; `daemon` supplies config, learners, outbox and metrics."""

    def __init__(self, daemon):
        self.d = daemon
        self.cfg = daemon.config
        self.pending: deque[_Pending] = deque()
        self.last_beat = time.monotonic()
        self.budget_ends = float("inf")     # set by the daemon's loop (ingest.loop_budget_s)
        self.frame_reports = Throttle(FRAME_REPORT_S)   # (device, reason) -> rate-limited lines

    # ------------------------------------------------------------------ frames

    def process_frames(self, batch: list[Inbound]) -> None:
        """Decode, validate and window `batch`, then encode and predict every completed
        window. Each frame, window and device is isolated: a hostile value, a window the
        encoder turns into NaN, or a learner that fails costs only its own device."""
        d, m = self.d, self.d.metrics
        spec_c = d.bundle.input.n_channels
        pending = []   # (device, window, arrival)
        for msg in batch:
            try:
                msg.refuse_oversized("frame", self.cfg.ingest.max_payload_bytes)
                frame = decode_frame(msg.payload, max_bytes=self.cfg.ingest.max_payload_bytes)
                if frame.n_channels != spec_c:
                    raise ProtocolError(
                        "bad_channels", f"frame seq={frame.seq} has {frame.n_channels} "
                        f"channels, the model expects {spec_c}")
                d.value_range.check(frame.values, f"frame seq={frame.seq}")
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
                if c.duplicates != before[2] and (
                        n := self.frame_reports.hit((msg.device, "duplicate"))) is not None:
                    log.info("device %s: %d frame(s) dropped as duplicates (seq %d already "
                             "seen; the stream is at seq %s)", msg.device, n, frame.seq,
                             wb.last_seq)
        if batch:
            d.scheduler.on_frames(len(batch))
        if not pending:
            return
        t0 = time.perf_counter()
        shape = d.bundle.input.shape
        x = np.stack([w.values.reshape(shape) for _, w, _ in pending])   # (B, *shape)
        m.windows.inc(len(pending))
        if d.encoder is None:                           # a whole-model bundle: predict only
            preds = self._classify(x, pending)
        else:
            latents, ok = self._encode(x, pending)      # (B, d), (B,): once for every learner
            preds = self._predict(latents, ok, pending)
            self._remember(latents, ok, pending)
        m.inference_batch_seconds.observe(time.perf_counter() - t0)
        now = time.monotonic()
        for (device, w, arrival), pred in zip(pending, preds, strict=True):
            if pred is None:              # refused above, with an event
                continue
            try:
                self._publish_prediction(device, w, arrival, now, pred)
            except (ValueError, TypeError) as exc:      # e.g. a probability not JSON-able
                self.reject_device(device, "predict_failed", f"window {w.index}: {exc}")

    def _classify(self, x: np.ndarray, pending: list) -> list:
        try:
            return self.d.classify(x)
        except Exception:  # noqa: BLE001 - isolate: fall back to one window at a time
            out = []
            for i, (device, w, _a) in enumerate(pending):
                try:
                    out.extend(self.d.classify(x[i:i + 1]))
                except Exception as exc:  # noqa: BLE001 - this window only
                    self.reject_device(device, "predict_failed", f"window {w.index}: {exc}")
                    out.append(None)
            return out

    def _encode(self, x: np.ndarray, pending: list) -> tuple[np.ndarray, np.ndarray]:
        """Latents (B, d) and which rows are usable (finite); a row the encoder fails on
        or turns into NaN/Inf is refused for its device only."""
        enc = self.d.encoder
        try:
            latents = enc.encode(x)
        except Exception:  # noqa: BLE001 - isolate: one window at a time
            latents = np.zeros((len(x), enc.latent_dim), np.float32)
            for i in range(len(x)):
                try:
                    latents[i] = enc.encode(x[i:i + 1])[0]
                except Exception as exc:  # noqa: BLE001 - this window only
                    latents[i] = np.nan
                    log.warning("encoder failed on one window: %s", exc)
        ok = np.isfinite(latents).all(axis=1)                               # (B,)
        for i in np.flatnonzero(~ok).tolist():
            device, w, _a = pending[i]
            self.reject_device(device, "non_finite_latent", f"window {w.index} (frames "
                               f"{w.seq_first}..{w.seq_last}): the encoder's output is not "
                               "finite; the window is dropped (are its values extreme?)")
        return latents, ok

    def _predict(self, latents: np.ndarray, ok: np.ndarray, pending: list) -> list:
        d = self.d
        preds: list = [None] * len(pending)
        groups: dict[int, tuple[object, list[int]]] = {}
        refused: set[str] = set()
        for i, (device, _w, _a) in enumerate(pending):
            if not ok[i] or device in refused:
                continue
            try:
                learner, problem = d.pool.for_prediction(device)
            except (ReverieError, OSError) as exc:   # not even the read-only learner
                refused.add(device)
                self.reject_device(device, "learner_failed", str(exc), once=True)
                continue
            if problem is not None:
                self.reject_device(device, problem.reason, str(problem), once=True)
            groups.setdefault(id(learner), (learner, []))[1].append(i)
        for learner, rows in groups.values():
            try:
                out = list(zip(rows, learner.predict_latents(latents[rows]), strict=True))
            except Exception:  # noqa: BLE001 - isolate: this learner, row by row
                out = []
                for i in rows:
                    try:
                        out.append((i, learner.predict_latents(latents[i:i + 1])[0]))
                    except Exception as exc:  # noqa: BLE001 - this window only
                        device, w, _a = pending[i]
                        self.reject_device(device, "predict_failed", f"window {w.index}: {exc}")
            for i, p in out:
                preds[i] = (p.label, p.confidence, p.prob_dict(), {
                    "decided_by": p.decided_by, "novelty": p.novelty,
                    "novelty_score": round(p.novelty_score, 6)})
        return preds

    def _remember(self, latents: np.ndarray, ok: np.ndarray, pending: list) -> None:
        """The usable windows go into the history (labels name them later), whether or
        not their prediction succeeded."""
        by_device: dict[str, list[int]] = {}
        for i, (device, _w, _a) in enumerate(pending):
            if ok[i]:
                by_device.setdefault(device, []).append(i)
        for device, rows in by_device.items():
            ws = [pending[i][1] for i in rows]
            self.d.history.add(device, np.array([w.index for w in ws], np.int64),
                               np.array([w.ts for w in ws], np.float64), latents[rows])

    def _publish_prediction(self, device, w, arrival, now, pred) -> None:
        d, m = self.d, self.d.metrics
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
                detail=f"window {w.index}: novelty {extra['novelty_score']:.3f} (1 - p under "
                "this device's known-class calibration)", window=w.index,
                score=extra["novelty_score"])

    # ------------------------------------------------------------------ labels

    def process_label(self, msg: Inbound) -> None:
        d = self.d
        try:
            msg.refuse_oversized("label", self.cfg.ingest.max_payload_bytes)
            label = decode_label(msg.payload, max_bytes=self.cfg.ingest.max_payload_bytes)
            if label.values is not None \
                    and label.values.shape == (d.bundle.input.window_samples,
                                               d.bundle.input.n_channels):
                d.value_range.check(label.values, f"label {label.id!r}")
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
        """Try the waiting labels again; past the loop's budget only the first one (each
        try learns at least one window, so a long label always progresses)."""
        now = time.monotonic()
        tried = False
        for _ in range(len(self.pending)):
            item = self.pending.popleft()
            if now < item.retry_at or (tried and self.over_budget()):
                self.pending.append(item)
                continue
            tried = True
            if not self._try_label(item, final=now >= item.deadline):
                self.pending.append(item)

    def over_budget(self) -> bool:
        """The worker has spent this loop's time on labels and commands: frames first."""
        return time.monotonic() >= self.budget_ends

    def _targets(self, item: _Pending, *, final: bool):
        """``(targets, missing)`` for the label: [(key, latent, ts)] and window ids not
        held; None to wait for windows not produced yet; "done" when refused (acked)."""
        d, msg, lab = self.d, item.msg, item.label
        device = msg.device
        key = f"{device}/{lab.id}"
        if lab.values is not None:
            spec = d.bundle.input
            if lab.values.shape != (spec.window_samples, spec.n_channels):
                self.reject(msg, "bad_shape", f"label {lab.id!r}: values are "
                            f"{lab.values.shape[0]}x{lab.values.shape[1]}, the model takes a "
                            f"window of {spec.window_samples}x{spec.n_channels} "
                            "(samples x channels)")
                d.ack(msg)
                return "done"
            h = d.encoder.encode(np.ascontiguousarray(lab.values.T).reshape(1, *spec.shape))[0]
            if not np.isfinite(h).all():
                self.reject(msg, "non_finite_latent", f"label {lab.id!r}: the encoder's "
                            "output for its values is not finite (are they extreme?)")
                d.ack(msg)
                return "done"
            return [(key, h, lab.ts if lab.ts is not None else time.time())], []
        if lab.windows:
            found, lat, missing, ts = d.history.by_ids(device, lab.windows, with_ts=True)
            ahead = [w for w in missing if w >= d.windows.next_index(device)]
            if ahead and not final:
                return None
            return [(f"{key}/{int(w)}", h, float(t))
                    for w, h, t in zip(found.tolist(), lat, ts.tolist(), strict=True)], missing
        span = d.history.time_span(device)
        if (span is None or span[1] < lab.to_ts) and not final:
            return None
        ids, ts, lat = d.history.by_time(device, lab.from_ts, lab.to_ts)
        targets = [(f"{key}/{int(w)}", h, float(t))
                   for w, t, h in zip(ids.tolist(), ts.tolist(), lat, strict=True)]
        if not targets:
            held = "none" if span is None else f"{span[0]:.3f}..{span[1]:.3f}"
            self.reject(msg, "unknown_window", f"label {lab.id!r}: no window of device "
                        f"{device} starts in [{lab.from_ts}, {lab.to_ts}] (history holds "
                        f"{held})")
            d.ack(msg)
            return "done"
        return targets, []

    def _try_label(self, item: _Pending, *, final: bool) -> bool:
        """Learn what the label names; False to come back later (windows not produced
        yet, a failed learn to retry, or this loop's time budget spent)."""
        d, msg, lab = self.d, item.msg, item.label
        device = msg.device
        found = self._targets(item, final=final)
        if found is None:
            return False
        if found == "done":
            return True
        targets, missing = found
        try:
            learner = d.pool.for_device(device) if targets else None
        except NoLearner as exc:
            if exc.reason == "learner_failed":       # may work later: not acknowledged
                return self._learn_failed(item, exc)
            self.reject(msg, exc.reason, f"label {lab.id!r}: {exc}")
            d.ack(msg)
            return True
        try:
            progressed = False
            for k, h, ts in targets:
                if k in item.learned:
                    continue
                if progressed and self.over_budget():
                    item.retry_at = 0.0             # continue in the next loop
                    return False
                progressed = True
                r = learner.learn_latent(h, lab.label, ts=ts, key=k)
                item.learned[k] = None
                item.stored += r.stored
                item.dup += r.duplicate
                item.new_class |= r.new_class
            # Group commit: the windows were logged without fsync; one fsync makes them
            # all durable before the PUBACK.
            if learner is not None:
                learner.sync()
        except InputError as exc:
            self.reject(msg, "bad_label", f"label {lab.id!r}: {exc}")
            d.ack(msg)
            return True
        except (ReverieError, OSError) as exc:
            return self._learn_failed(item, exc)
        if missing:
            self.reject(msg, "unknown_window", f"label {lab.id!r}: window(s) {missing[:20]} "
                        f"of device {device} are not in the history (last "
                        f"{self.cfg.ingest.history_windows} windows kept)")
        d.ack(msg)
        if not targets:
            return True
        m = d.metrics
        dup = item.dup
        if dup == len(targets):
            m.labels_duplicate.inc()
        else:
            m.labels_learned.inc()
        m.label_ack_seconds.observe(time.monotonic() - msg.arrival)
        d.publish_event(
            device, type="label", reason="duplicate" if dup == len(targets) else "learned",
            detail=f"label {lab.id!r} = {lab.label!r}: {len(targets)} window(s), "
            f"{item.stored} stored", id=lab.id, label=lab.label, windows=len(targets),
            stored=item.stored, new_class=item.new_class, duplicates=dup)
        if item.new_class:
            d.status_changed()
        return True

    def _learn_failed(self, item: _Pending, exc: Exception) -> bool:
        # Not acknowledged: retried here every few seconds (the windows learned so far
        # are remembered), and redelivered by the broker if the agent stops meanwhile.
        lab, device = item.label, item.msg.device
        log.error("label %r of %s not learned, retrying in %.0f s: %s", lab.id, device,
                  LEARN_RETRY_S, exc)
        self.reject(item.msg, "learn_failed", f"label {lab.id!r}: {exc} (retrying)")
        item.retry_at = time.monotonic() + LEARN_RETRY_S
        item.deadline = max(item.deadline, item.retry_at)
        return False

    # ------------------------------------------------------------------ commands

    def process_command(self, msg: Inbound) -> None:
        self.d.commands.process(msg)

    # ------------------------------------------------------------------ errors

    def reject_device(self, device: str, reason: str, detail: str, *, once: bool = False) -> None:
        """Count, log and publish an error event about `device` (``once``: rate-limited
        per device and reason by `frame_reports`; the counter still counts each)."""
        self.d.metrics.dropped.inc(reason=reason)
        if once and self.frame_reports.hit((device, reason)) is None:
            return
        log.warning("device %s: %s", device, detail)
        self.d.publish_event(device, type="error", reason=reason, detail=detail)

    def reject(self, msg: Inbound, reason: str, detail: str, *, count: bool = True) -> None:
        if count:
            self.d.metrics.dropped.inc(reason=reason)
        if msg.kind == "frames":     # a device sending nothing but bad frames: not a line each
            n = self.frame_reports.hit((msg.device, reason))
            if n is None:
                return
            detail = (f"{detail} ({n} frames of {msg.device} rejected for {reason} in the last "
                      f"{FRAME_REPORT_S:g} s)" if n > 1 else f"{detail} (more such frames of "
                      f"{msg.device}: one line every {FRAME_REPORT_S:g} s with the count)")
        log.warning("rejected message on %s: %s", msg.topic, detail)
        self.d.publish_event(msg.device, type="error", reason=reason, detail=detail,
                             topic=msg.topic)
