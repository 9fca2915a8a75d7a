"""The sleep loop behind `Learner.sleep`: replay -> train adapters -> gate -> swap or roll back
-> scheduled forgetting -> checkpoint.

1. **Snapshot** under the learner's lock: the current adapted head (the *teacher*), the
   class list and copies of the stored episodes. Everything after runs on copies, without
   the lock, so predictions keep using the current head throughout.
2. **Split**: a held-out slice of each class's episodes (`replay.holdout_mask`) plus half
   of the bundle's exemplars that were not seeded into the memory (base classes) form the
   gate set; the other half joins the stored episodes in replay.
3. **Train** the student (the teacher's adapters + zero rows for classes it lacks) with
   the numba step: class-balanced, surprise-prioritized replay, pseudo-latents for thin
   classes, cross-entropy to the labels + distillation to the teacher's logits on its own
   classes (on every replayed sample, so old classes keep their relative structure). Stops at ``replay_samples``, at the budget, or at once when ``stop`` is set
   (checked between mini-batches, each well under a millisecond on a head of 64-128 units).
4. **Gate**: the learner's prediction without its schema readout (head fused with the
   fast memory, whose neighbours are the training episodes) on the gate set, with the
   teacher and with the student. Accepted iff old-class accuracy drops by at most
   ``max_old_drop``, no class with at least ``min_class_held_out`` held-out samples (the
   newest classes included) drops by more than ``max_class_drop``, and overall accuracy
   drops by at most ``max_overall_drop``; a rejection names the rule, the class and the
   numbers. "Old" = classes the teacher outputs. The schema readout
   (agent/memory/schema.py) is left out on purpose: a sleep does not change it, it has
   learned the gate samples, and pooled in it masks a wrecked head (one wrecked by a huge
   learning rate still scored 100 % on the gate with it, tests/agent/sleep). (The fast
   side is the default readout, per-class nearest episode; ``readout="vote"`` and the
   associative readout are not modelled.) After the swap every class in the gate set is
   a head class, so the fused prediction is the head's: the gate compares the learner as
   it was with the head that will replace it, including on the classes it takes over.
5. **Commit** under the lock (unless stopped): swap the head object, mark the replayed
   episodes replayed, multiply their strength by ``forget_factor``, evict consolidated
   episodes below ``evict_below`` (never leaving a class under ``keep_per_class``), and
   checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from agent.errors import ReverieError
from agent.inference import softmax
from agent.learner import kernels as fusion_kernels
from agent.sleep import kernels
from agent.sleep.adapters import AdaptedHead
from agent.sleep.replay import EpisodeSet, ReplayStream, holdout_mask
from agent.sleep.report import Accuracy, SleepReport

if TYPE_CHECKING:
    from agent.learner.config import SleepConfig
    from agent.learner.learner import Learner

log = logging.getLogger("reverie.sleep")
CHUNK_BATCHES = 32          # mini-batches drawn (and teacher-labelled) at once
LOSS_WINDOW = 10            # mini-batches averaged for loss_first / loss_last
NOT_STORED = np.uint64(2**64 - 1)   # id of a replayed sample that is not a memory episode


def consolidate(learner: Learner, budget_s: float,
                stop: threading.Event | None = None) -> SleepReport:
    """Run one sleep on `learner`; see the module docstring. Never raises for a failed
    sleep: the report says what happened (``accepted``, ``reason``)."""
    t0 = time.monotonic()
    stop = stop or threading.Event()
    if not isinstance(budget_s, int | float) or not budget_s > 0:
        raise ValueError(f"budget_s={budget_s!r}, expected a number of seconds > 0")
    if not learner._sleep_lock.acquire(blocking=False):
        return SleepReport(False, "busy: another sleep is running", 0.0,
                           adapter_version=learner.adapted_head.version)
    try:
        return _Sleep(learner, budget_s, stop, t0).run()
    finally:
        learner._sleep_lock.release()


class _Sleep:
    def __init__(self, learner: Learner, budget_s: float, stop: threading.Event, t0: float):
        self.learner = learner
        self.cfg = learner.config.sleep
        self.stop = stop
        self.t0 = t0
        self.deadline = t0 + budget_s
        self.info: dict = {}

    def report(self, accepted: bool, reason: str, **kw) -> SleepReport:
        head = self.learner.adapted_head
        classes = tuple(self.learner.classes[: head.n_classes])
        out = SleepReport(accepted, reason, time.monotonic() - self.t0,
                          adapter_version=head.version, head_classes=classes,
                          preempted=reason == "preempted", **{**self.info, **kw})
        log.info("sleep: %s (%s) in %.2f s, %d samples", "accepted" if accepted else
                 "rolled back", reason, out.duration_s, out.samples_replayed)
        return out

    def run(self) -> SleepReport:
        L = self.learner
        with L._lock:
            teacher = L.adapted_head
            classes = tuple(L.classes)
            episodes = L.memory.get(L.memory.ids())
            sleeps = L._n_sleeps
            L._n_sleeps += 1
        if self.stop.is_set():
            return self.report(False, "preempted")
        rng = np.random.default_rng([L.config.seed, sleeps])
        eps = EpisodeSet(episodes.ids, episodes.latents.astype(np.float32) + L.center,
                         episodes.labels.astype(np.int64), episodes.surprise)
        held = holdout_mask(eps.labels, self.cfg.holdout_fraction, rng)
        memory_train = eps.subset(~held)
        ex_train, ex_gate = self._exemplars(rng)
        train = memory_train.concat(ex_train)
        gate = eps.subset(held).concat(ex_gate)
        self.info.update(episodes_train=len(train), episodes_held_out=len(gate))
        if len(memory_train) == 0:
            return self.report(False, "nothing to replay: the memory holds no episodes")
        if len(gate) < self.cfg.min_held_out:
            return self.report(False, f"too few held-out samples to validate "
                                      f"({len(gate)} < min_held_out={self.cfg.min_held_out})")
        student0 = teacher.with_classes(len(classes))
        stream = ReplayStream(train, len(classes), surprise_share=self.cfg.surprise_share,
                              pseudo_below=self.cfg.pseudo_below,
                              pseudo_share=self.cfg.pseudo_share,
                              seed=int(rng.integers(2**62)))
        theta, replayed = self._train(student0, teacher, stream)
        if theta is None:
            return self.report(False, "preempted")
        if self.info["steps"] == 0:
            return self.report(False, "no training step fit in the budget (or replay_samples=0)")
        try:
            student = student0.unpack(
                theta, version=max(teacher.version, L.max_adapter_version) + 1)
        except (ValueError, ReverieError) as exc:
            return self.report(False, f"diverged: {exc}")
        if self.stop.is_set():
            return self.report(False, "preempted")
        before, after = self._evaluate(teacher, student, memory_train, gate, len(classes))
        self.info.update(acc_before=before, acc_after=after)
        reason = _gate(before, after, self.cfg)
        if reason:
            return self.report(False, reason)
        if self.stop.is_set():
            return self.report(False, "preempted")
        replayed = replayed[replayed < len(memory_train)]      # not the bundle's exemplars
        return self._commit(teacher, student, memory_train.ids[replayed])

    # ------------------------------------------------------------------ steps

    def _exemplars(self, rng: np.random.Generator) -> tuple[EpisodeSet, EpisodeSet]:
        """The bundle's exemplars the memory was not seeded with (base classes), split
        half for replay, half for the gate; empty sets without exemplars."""
        L = self.learner
        ex = L._exemplars   # loaded (and hash-checked) once, when the learner started
        if ex is None:
            empty = EpisodeSet(np.zeros(0, np.uint64), np.zeros((0, L.latent_dim), np.float32),
                               np.zeros(0, np.int64), np.zeros(0, np.float32))
            return empty, empty
        lab = ex["labels"]
        rank = np.zeros(lab.shape[0], np.int64)             # position within its class
        for c in np.unique(lab):
            rows = np.flatnonzero(lab == c)
            rank[rows] = np.arange(rows.shape[0])
        unseeded = rank >= L.config.exemplars_per_class
        extra = EpisodeSet(np.full(lab.shape[0], NOT_STORED, np.uint64),
                           ex["latents"].astype(np.float32), lab.astype(np.int64),
                           np.zeros(lab.shape[0], np.float32)).subset(unseeded)
        to_gate = holdout_mask(extra.labels, 0.5, rng)
        return extra.subset(~to_gate), extra.subset(to_gate)

    def _train(self, student0: AdaptedHead, teacher: AdaptedHead, stream: ReplayStream):
        """-> (trained theta, training rows replayed) or (None, None) when stopped."""
        cfg = self.cfg
        p = student0.pack()
        theta = p.theta.copy()
        grad, m, v = (np.zeros_like(theta) for _ in range(3))
        bs = cfg.batch_size
        # Floats, always: an int here would compile (and cache) a second kernel signature.
        kd, temp = float(cfg.distill_weight), float(cfg.distill_temperature)
        adam = (float(cfg.lr), float(cfg.beta1), float(cfg.beta2), float(cfg.adam_eps),
                float(cfg.max_grad_norm))
        done = steps = n_pseudo = 0
        losses: list[float] = []
        used: list[np.ndarray] = []
        stopped = False
        while done < cfg.replay_samples and time.monotonic() < self.deadline and not stopped:
            X, y, rows = stream.draw(min(bs * CHUNK_BATCHES, cfg.replay_samples - done))
            T = teacher.logits(X)                                       # (n, Kp) f32
            for s in range(0, X.shape[0], bs):
                stopped = self.stop.is_set()
                if stopped or time.monotonic() >= self.deadline:
                    X, y, rows = X[:s], y[:s], rows[:s]
                    break
                steps += 1
                losses.append(kernels.train_step(
                    X[s: s + bs], y[s: s + bs], T[s: s + bs], p.layout, p.rank, p.n_new,
                    p.nw_off, p.act, p.wflat, p.bflat, theta, kd, temp, grad, m, v, steps,
                    *adam))
            done += X.shape[0]
            n_pseudo += int((rows < 0).sum())
            used.append(rows[rows >= 0])
        self.info.update(
            samples_replayed=done, pseudo_samples=n_pseudo, steps=steps,
            loss_first=float(np.mean(losses[:LOSS_WINDOW])) if losses else None,
            loss_last=float(np.mean(losses[-LOSS_WINDOW:])) if losses else None)
        if stopped or self.stop.is_set():
            return None, None
        rows = np.concatenate(used) if used else np.zeros(0, np.int64)
        return theta, rows

    def _evaluate(self, teacher, student, train: EpisodeSet, gate: EpisodeSet, n_classes):
        """The learner's fused prediction with either head, the fast system's neighbours
        being the training episodes (exact cosine kNN, as the memory's index answers)."""
        L = self.learner
        k = min(L.config.k_neighbors, len(train))
        gate_x, gate_y = gate.latents, gate.labels
        q = _unit(gate_x - L.center)                                     # (G, d)
        db = _unit(train.latents - L.center)                             # (n, d)
        sim = q @ db.T                                                   # (G, n)
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]                # (G, k)
        nb_labels = train.labels[top].astype(np.int32)
        nb_dist = (1.0 - np.take_along_axis(sim, top, axis=1)).astype(np.float32)
        kp = teacher.n_classes
        cfg = L.config
        names = [L.classes[c] for c in np.unique(gate_y)]

        def accuracy(head: AdaptedHead) -> Accuracy:
            p_head = softmax(head.logits(gate_x).astype(np.float64))     # (G, Kh)
            probs, _, _ = fusion_kernels.fuse_max_similarity(nb_labels, nb_dist, p_head,
                                                          n_classes, cfg.temperature)
            hit = probs.argmax(axis=1) == gate_y
            old = gate_y < kp
            mean = lambda m: float(hit[m].mean()) if m.any() else None   # noqa: E731
            per = {n: mean(gate_y == c) for n, c in zip(names, np.unique(gate_y), strict=True)}
            per_n = {n: int((gate_y == c).sum()) for n, c in zip(names, np.unique(gate_y),
                                                                  strict=True)}
            return Accuracy(mean(old), mean(~old), mean(np.ones_like(old)),
                            int(old.sum()), int((~old).sum()), per, per_n)

        return accuracy(teacher), accuracy(student)

    def _commit(self, teacher: AdaptedHead, student: AdaptedHead,
                replayed_ids: np.ndarray) -> SleepReport:
        L, cfg = self.learner, self.cfg
        with L._lock:
            if L.adapted_head is not teacher:     # replaced meanwhile (e.g. a restore)
                return self.report(False, "superseded: the head changed during the sleep")
            L._keep_previous_head(teacher)
            L.adapted_head = student
            L.max_adapter_version = max(L.max_adapter_version, student.version)
            L.memory.mark_replayed(replayed_ids, time.time())
            decayed = L.memory.decay(np.unique(replayed_ids), cfg.forget_factor)
            evicted = _evict(L.memory, cfg.evict_below, cfg.keep_per_class)
            reason = "accepted"
            if L.state is not None and cfg.checkpoint:
                try:
                    L.checkpoint()
                except (ReverieError, OSError) as exc:   # the swap stands; the next checkpoint keeps it
                    log.warning("sleep: checkpoint after the swap failed: %s", exc)
                    reason = f"accepted; checkpoint failed: {exc}"
        return self.report(True, reason, episodes_decayed=decayed, episodes_evicted=evicted)


def _gate(before: Accuracy, after: Accuracy, cfg: SleepConfig) -> str | None:
    """None when the student may replace the teacher, else why not: old-class accuracy,
    then every class with enough held-out samples (the newest too), then overall."""
    tol = 1e-9
    if before.old is not None and after.old < before.old - cfg.max_old_drop - tol:
        return (f"gate: old-class accuracy fell {before.old:.3f} -> {after.old:.3f} "
                f"(allowed drop {cfg.max_old_drop:.3f}, {before.n_old} samples)")
    for name, n in before.per_class_n.items():
        a, b = before.per_class[name], after.per_class[name]
        if n >= cfg.min_class_held_out and b < a - cfg.max_class_drop - tol:
            return (f"gate: class {name!r} accuracy fell {a:.3f} -> {b:.3f} (allowed drop "
                    f"{cfg.max_class_drop:.3f}, {n} samples)")
    if after.all < before.all - cfg.max_overall_drop - tol:
        return (f"gate: overall accuracy fell {before.all:.3f} -> {after.all:.3f} "
                f"(allowed drop {cfg.max_overall_drop:.3f})")
    return None


def _evict(memory, floor: float, keep_per_class: int) -> int:
    """Remove episodes with strength < floor, weakest first, keeping >= keep_per_class
    per class. Caller holds the learner's lock."""
    if floor <= 0 or len(memory) == 0:
        return 0
    ep = memory.get(memory.ids())
    drop = []
    for c in np.unique(ep.labels):
        rows = np.flatnonzero(ep.labels == c)
        rows = rows[np.argsort(ep.strength[rows], kind="stable")]
        weak = rows[ep.strength[rows] < floor][: max(rows.shape[0] - keep_per_class, 0)]
        drop.append(ep.ids[weak])
    return memory.remove(np.concatenate(drop)) if drop else 0


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)
