"""`Learner`: the bundle's frozen encoder and head (slow system) in front of a sparse
episodic memory (fast system) that learns from single labelled windows.

    learner = Learner.from_bundle("bundle/", LearnerConfig(), state_dir="state/")
    p = learner.predict_one(window)          # Prediction(label, probs, confidence, ...)
    learner.learn_one(window, "new-gesture") # a never-seen label creates a class at once
    report = learner.sleep(budget_s=30)      # consolidate the memory into the head's adapters

Writes are single-owner (an internal lock); predictions may run concurrently with them
(the memory guards hnswlib with its own lock). With a state directory, every stored
episode is appended to the write-ahead log (fsynced before `learn_one` returns when
``durable``) before it touches memory, and checkpoints are taken every
``checkpoint_every`` episodes, on `save` and after an accepted `sleep`; a restart = last
checkpoint + log replay.

The slow system is `adapted_head`: the bundle's head with low-rank adapters and rows for
classes consolidated by `sleep` (agent/sleep). Its outputs are classes 0..Kh-1 (the
bundle's, then consolidated device classes); the fusion treats exactly those as the
head's. `sleep` trains a copy off the predicting thread and swaps the object at the end.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.bundle import Bundle, load_bundle
from agent.errors import InputError
from agent.head import Head
from agent.inference import Encoder, softmax
from agent.learner import fusion, kernels
from agent.learner.config import LearnerConfig
from agent.learner.state import LearnerState, restore, snapshot
from agent.memory import (
    AssociativeReadout,
    EpisodicMemory,
    MemoryConfig,
    ReadoutConfig,
    SparseCoder,
)
from agent.persist import StateDir
from agent.sleep import AdaptedHead, SleepReport

log = logging.getLogger("reverie.learner")
MAX_LABEL_CHARS = 64
MAX_SEEN_KEYS = 20_000   # label keys remembered for deduplication (checkpointed)
MAX_PREVIOUS_HEADS = 3   # earlier adapters kept in memory for `rollback_adapter`
_DECIDED = ("slow", "agree", "fast")


@dataclass(frozen=True)
class Prediction:
    label: str
    probs: np.ndarray            # (K,) over `classes`
    classes: tuple[str, ...]
    confidence: float
    decided_by: str              # "slow" (head), "fast" (memory), "agree"
    novelty: bool                # far from everything the memory holds
    novelty_score: float         # cosine distance to the nearest stored episode
    latency_us: float

    def prob_dict(self) -> dict[str, float]:
        return dict(zip(self.classes, self.probs.tolist(), strict=True))


@dataclass(frozen=True)
class LearnResult:
    stored: bool
    surprise: float
    new_class: bool
    episode_id: int | None
    prediction: Prediction | None
    duplicate: bool = False      # the key was learned before: nothing done


class Learner:
    """See the module docstring. Construct with `from_bundle` or `load`."""

    def __init__(self, bundle: Bundle, config: LearnerConfig | None = None, *,
                 state_dir: str | Path | None = None, encoder: Encoder | None = None):
        config = config or LearnerConfig()
        self.bundle = bundle
        self.config = config
        if encoder is not None and encoder.bundle.bundle_id != bundle.bundle_id:
            raise ValueError(f"encoder of bundle {encoder.bundle.bundle_id}, learner of "
                             f"{bundle.bundle_id}")
        # Several learners (a gateway's per-device learners) may share one encoder session.
        self.encoder = encoder or Encoder(bundle, threads=config.threads)
        self._seen: dict[str, None] = {}  # label keys already learned, oldest first
        self.head = Head.from_npz(bundle.file("head.npz"), bundle.manifest)   # frozen base
        # The slow system predictions use; replaced (never mutated) by an accepted sleep.
        self.adapted_head = AdaptedHead.fresh(self.head, config.sleep.rank, config.seed)
        self._sleep_lock = threading.Lock()
        self._previous_heads: list[AdaptedHead] = []
        self._n_sleeps = 0
        self.latent_dim = self.encoder.latent_dim
        self.classes: list[str] = list(bundle.classes)
        self._index = {c: i for i, c in enumerate(self.classes)}
        self._lock = threading.RLock()
        self._rng = np.random.default_rng(config.seed)
        self.n_stored = 0                 # episodes learned since creation (incl. replayed)
        self._since_checkpoint = 0
        self.novelty_threshold: float | None = None
        exemplars = self._exemplars = self._load_exemplars()   # sleep replays them too
        # The memory compares latents centred on the mean training latent: non-negative
        # (post-ReLU) latents share a dominant direction that swamps cosine similarity.
        self.center = (exemplars["latent_mean"] if exemplars is not None and config.center
                       else np.zeros(self.latent_dim, np.float32))
        self.coder = self._make_coder(exemplars)
        self.memory = EpisodicMemory(MemoryConfig(
            capacity=config.capacity, dim=self.latent_dim, code_k=self.coder.k,
            ef_search=config.ef_search, latent_dtype=config.latent_dtype, seed=config.seed))
        self.readout = AssociativeReadout(ReadoutConfig(n_units=self.coder.n_units,
                                                        code_k=self.coder.k))
        self.state: StateDir | None = None
        self.recovery_warnings: list[str] = []
        if state_dir is not None:
            self.state = StateDir(state_dir)
            rec = self.state.recover()
            self.recovery_warnings = list(rec.warnings)
            for w in rec.warnings:
                log.warning("state recovery: %s", w)
            if rec.checkpoint is not None:
                restore(self, LearnerState.from_checkpoint(rec.checkpoint))
            else:
                self._seed(exemplars)
            for _seq, payload in rec.records:
                kind, meta, arrays = LearnerState.decode_record(payload)
                if kind == "episode":
                    self._apply(arrays["h"], str(meta["label"]), float(meta["surprise"]),
                                float(meta["ts"]))
                if meta.get("key") is not None:
                    self._remember(str(meta["key"]))
            if rec.records:
                log.info("replayed %d logged episode(s)", len(rec.records))
        else:
            self._seed(exemplars)

    @classmethod
    def from_bundle(cls, path: str | Path, config: LearnerConfig | None = None, *,
                    state_dir: str | Path | None = None, public_keys=None) -> Learner:
        """Load and verify the bundle (hashes; signature when keys are given)."""
        return cls(load_bundle(path, public_keys=public_keys), config, state_dir=state_dir)

    @classmethod
    def load(cls, state_dir: str | Path, bundle: str | Path,
             config: LearnerConfig | None = None, *, public_keys=None) -> Learner:
        """Restore a learner saved in `state_dir` (checkpoint + log) on top of `bundle`."""
        return cls.from_bundle(bundle, config, state_dir=state_dir, public_keys=public_keys)

    # ------------------------------------------------------------------ set-up

    def _load_exemplars(self) -> dict[str, np.ndarray] | None:
        if "exemplars.npz" not in self.bundle.manifest["files"]:
            return None
        from agent.learner.state import load_exemplars

        return load_exemplars(self.bundle, self.latent_dim)

    def _make_coder(self, exemplars) -> SparseCoder:
        files = self.bundle.manifest["files"]
        if self.config.use_sae and "sae.npz" in files:
            with np.load(self.bundle.file("sae.npz"), allow_pickle=False) as z:
                return SparseCoder.from_sae(z["W_enc"], z["b_enc"], int(z["k"]))
        center = None if exemplars is None else exemplars["latent_mean"]
        return SparseCoder(self.latent_dim, self.config.sparse, center=center)

    def _seed(self, exemplars) -> None:
        """Seed the memory with the bundle's base-class exemplars (consolidated, surprise 0)
        and calibrate the novelty threshold on them.

        The memory's schema readout (class means, shared covariance) starts from the
        bundle's statistics of every base training latent when it ships them (then it is
        the streaming LDA that had seen the whole base training set; they replace what
        storing the exemplars taught it, since they include those: no double count); from
        an older bundle, it learns every exemplar (the stored ones and the rest)."""
        if exemplars is None:
            return
        lat, lab = exemplars["latents"], exemplars["labels"]
        keep = np.concatenate([np.flatnonzero(lab == c)[: self.config.exemplars_per_class]
                               for c in np.unique(lab)] + [np.zeros(0, np.int64)])
        has_stats = "class_scatter" in exemplars
        if not has_stats:
            rest = np.setdiff1d(np.arange(lab.shape[0]), keep)
            for h, y in zip(lat[rest], lab[rest], strict=True):
                self.memory.observe(h - self.center, int(y))
        lat, lab = lat[keep], lab[keep]
        codes = self.coder.encode(lat) if len(lat) else []
        for h, code, y in zip(lat, codes, lab, strict=True):
            self.memory.add(h - self.center, code, int(y), surprise=0.0, ts=0.0)
            self.readout.learn(code, int(y))
        if has_stats:   # statistics are shift-invariant but the means: centre them too
            self.memory.schema.seed_stats(exemplars["class_counts"],
                                          exemplars["class_means"] - self.center,
                                          exemplars["class_scatter"])
        if len(lat) >= 2:
            u = lat - self.center
            u = u / np.linalg.norm(u, axis=1, keepdims=True)
            d = 1.0 - u @ u.T
            np.fill_diagonal(d, np.inf)
            nn = d.min(axis=1)
            self.novelty_threshold = float(self.config.novelty_margin *
                                           np.quantile(nn, self.config.novelty_quantile))

    # ------------------------------------------------------------------ inputs

    def _windows(self, windows, *, single: bool) -> np.ndarray:
        shape = self.bundle.input.shape
        x = np.asarray(windows)
        if x.dtype.kind not in "fiu":
            raise InputError(f"window dtype {x.dtype}, expected numbers (float32)")
        if single:
            if x.shape != shape:
                raise InputError(f"window has shape {x.shape}, expected {shape}")
            x = x[None]
        elif x.ndim != len(shape) + 1 or x.shape[1:] != shape:
            raise InputError(f"windows have shape {x.shape}, expected (B, {', '.join(map(str, shape))})")
        x = x.astype(np.float32, copy=False)
        bad = ~np.isfinite(x)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InputError(f"window holds NaN/Inf (first at index {where}); rejected")
        return x

    def _class_index(self, label) -> tuple[int, bool]:
        if not isinstance(label, str) or not label or len(label) > MAX_LABEL_CHARS \
                or not label.isprintable():
            raise InputError(f"label {label!r}: expected a printable string of 1-"
                             f"{MAX_LABEL_CHARS} characters")
        idx = self._index.get(label)
        if idx is not None:
            return idx, False
        self.classes.append(label)
        self._index[label] = len(self.classes) - 1
        log.info("new class %r (index %d)", label, len(self.classes) - 1)
        return len(self.classes) - 1, True

    # ------------------------------------------------------------------ predict

    def _predict_latents(self, latents: np.ndarray, t0: float) -> list[Prediction]:
        """Slow and fast system on a batch of latents (B, d), fused per row."""
        cfg = self.config
        head = self.adapted_head          # one read: a concurrent sleep may swap it
        p_head = softmax(head.logits(latents).astype(np.float64))            # (B, Kh)
        n_classes = len(self.classes)
        centred = latents - self.center                                      # (B, d)
        labels, dist = self.memory.neighbours(centred, cfg.k_neighbors)      # (B, k)
        if cfg.readout == "max" and not cfg.assoc_weight:   # the fast path: one kernel
            probs, decided = kernels.fuse_max_similarity(labels, dist, p_head, n_classes,
                                                         cfg.temperature)
            who = [_DECIDED[d] for d in decided.tolist()]
        else:
            if cfg.readout == "max":
                knn = fusion.max_similarity_batch(labels, dist, n_classes, cfg.temperature)
            else:
                knn = np.stack([fusion.knn_scores(lb, d, n_classes, cfg.vote_power)
                                for lb, d in zip(labels, dist, strict=True)])
            if cfg.assoc_weight:
                codes = self.coder.encode(latents)                           # (B, k_active)
                assoc = self.readout.scores_batch(codes)                     # (B, K')
                p_fast = np.stack([fusion.mix_fast(kn, a, cfg.assoc_weight)
                                   for kn, a in zip(knn, assoc, strict=True)])
            else:
                p_fast = knn
            probs, who = fusion.fuse_batch(p_head, p_fast)                   # (B, K)
        if cfg.schema_weight:
            p_schema = self.memory.schema_posterior(centred, n_classes,
                                                    cfg.schema_temperature)  # (B, K)
            if cfg.schema_min_count:                 # abstain on classes not formed yet
                formed = self.memory.schema_counts(n_classes) >= cfg.schema_min_count
                p_schema[~formed[probs.argmax(axis=1)]] = 0.0
            probs, who = fusion.mix_schema(probs, who, p_schema, cfg.schema_weight)
        return self._predictions(probs, who, dist, t0)

    def _predictions(self, probs, who, dist, t0) -> list[Prediction]:
        nearest = dist[:, 0] if dist.shape[1] else np.full(len(probs), np.inf)
        best = probs.argmax(axis=1)
        latency = (time.perf_counter() - t0) * 1e6 / len(probs)
        classes = tuple(self.classes)
        thr = self.novelty_threshold
        return [Prediction(classes[b], p, classes, float(p[b]), w,
                           bool(thr is not None and nd > thr), float(nd), latency)
                for b, p, w, nd in zip(best.tolist(), probs, who, nearest.tolist(), strict=True)]

    def predict_one(self, window) -> Prediction:
        """Predict one window of the bundle's input shape."""
        t0 = time.perf_counter()
        x = self._windows(window, single=True)
        return self._predict_latents(self.encoder.encode(x), t0)[0]

    def predict_many(self, windows) -> list[Prediction]:
        """Predict a batch (B, *input_shape); the encoder runs once for the batch."""
        t0 = time.perf_counter()
        x = self._windows(windows, single=False)
        return self._predict_latents(self.encoder.encode(x), t0) if len(x) else []

    def encode(self, windows) -> np.ndarray:
        """Validated windows (B, *input_shape) -> latents (B, latent_dim) float32."""
        x = self._windows(windows, single=False)
        return self.encoder.encode(x) if len(x) else np.zeros((0, self.latent_dim), np.float32)

    def predict_latents(self, latents: np.ndarray) -> list[Prediction]:
        """Predict from latents `encode` returned (a caller that keeps the latents, e.g.
        the daemon's recent-window history, encodes once and predicts from them)."""
        t0 = time.perf_counter()
        h = self._latents(latents)
        return self._predict_latents(h, t0) if len(h) else []

    def _latents(self, latents) -> np.ndarray:
        h = np.asarray(latents)
        if h.ndim != 2 or h.shape[1] != self.latent_dim or h.dtype != np.float32:
            raise InputError(f"latents are {h.dtype}{list(h.shape)}, expected float32 "
                             f"[B, {self.latent_dim}]")
        if not np.isfinite(h).all():
            raise InputError("latents hold NaN/Inf; rejected")
        return h

    # ------------------------------------------------------------------ learn

    def seen(self, key: str) -> bool:
        """True if a label with this key was learned (deduplication of redelivered labels)."""
        return key in self._seen

    def _remember(self, key: str) -> None:
        self._seen[key] = None
        if len(self._seen) > MAX_SEEN_KEYS:
            del self._seen[next(iter(self._seen))]

    def learn_one(self, window, label: str, *, ts: float | None = None,
                  key: str | None = None) -> LearnResult:
        """Learn from one labelled window: store it when it surprised the model.

        A label never seen before creates a class. With a state directory, the episode is
        in the write-ahead log (fsynced when ``durable``) before this returns. With a `key`
        (e.g. the label message's id), a key learned before is a duplicate: nothing is
        done and ``duplicate`` is True, also after a restart.
        """
        x = self._windows(window, single=True)
        return self.learn_latent(self.encoder.encode(x)[0], label, ts=ts, key=key)

    def learn_latent(self, latent: np.ndarray, label: str, *, ts: float | None = None,
                     key: str | None = None) -> LearnResult:
        """`learn_one` for a latent `encode` returned, shape (latent_dim,)."""
        t0 = time.perf_counter()
        h = self._latents(np.asarray(latent)[None])
        ts = time.time() if ts is None else float(ts)
        if key is not None and (not isinstance(key, str) or not key or len(key) > 256):
            raise InputError(f"label key {key!r}: expected a string of 1-256 characters")
        with self._lock:
            if key is not None and key in self._seen:
                return LearnResult(False, 0.0, False, None, None, duplicate=True)
            idx, new_class = self._class_index(label)
            pred = self._predict_latents(h, t0)[0]
            surprise = float(1.0 - pred.probs[idx]) if idx < len(pred.probs) else 1.0
            surprise = min(max(surprise, 0.0), 1.0)
            counts = self.memory.class_counts()
            held = int(counts[idx]) if idx < counts.shape[0] else 0
            store = (surprise >= self.config.surprise_threshold
                     or held < self.config.min_class_episodes
                     or self._rng.random() < self.config.store_confident_rate)
            eid = None
            if store:
                if self.state is not None:
                    self.state.log(LearnerState.encode_episode(h[0], label, surprise, ts, key),
                                   durable=self.config.durable)
                eid = self._apply(h[0], label, surprise, ts)
                self._since_checkpoint += 1
            elif key is not None and self.state is not None:
                # Not stored, but remembered: a redelivery after a crash must not store it.
                self.state.log(LearnerState.encode_seen(key), durable=self.config.durable)
            if key is not None:
                self._remember(key)
            if store and self.state is not None \
                    and self._since_checkpoint >= self.config.checkpoint_every:
                self.checkpoint()
        return LearnResult(store, surprise, new_class, eid, pred)

    def _apply(self, h: np.ndarray, label: str, surprise: float, ts: float) -> int:
        idx, _ = self._class_index(label)
        code = self.coder.encode_one(h)
        eid = self.memory.add(h - self.center, code, idx, surprise=surprise, ts=ts)
        self.readout.learn(code, idx)
        self.n_stored += 1
        return eid

    # ------------------------------------------------------------------ sleep

    def sleep(self, budget_s: float = 30.0,
              stop_event: threading.Event | None = None) -> SleepReport:
        """Consolidate the episodic memory into the head's adapters (agent/sleep).

        Replays stored episodes (class-balanced, surprise-prioritized, plus pseudo-latents
        for thin classes) with distillation from the current head, validates on a held-out
        slice and swaps the new adapter in only if old-class accuracy holds; then decays
        the replayed episodes and checkpoints. Call it from a thread other than the one
        predicting: predictions keep using the current head meanwhile. Setting
        `stop_event` ends it within ~100 ms, leaving the current head in place.

        >>> report = learner.sleep(budget_s=10)            # doctest: +SKIP
        >>> report.accepted, report.reason, report.acc_after.new   # doctest: +SKIP
        (True, 'accepted', 0.95)
        """
        from agent.sleep.consolidate import consolidate  # on first use: it imports agent.learner

        return consolidate(self, budget_s, stop_event)

    def rollback_adapter(self, to_version: int | None = None) -> int:
        """Put back an earlier adapter: the one before the current (default; kept in memory
        since start-up), or ``to_version=0``, the bundle's head without adapters. The
        memory keeps every episode. Checkpoints; returns the adapter version now in use.
        """
        with self._lock:
            current = self.adapted_head
            if to_version is None:
                if not self._previous_heads:
                    raise InputError(
                        f"no earlier adapter than version {current.version} in memory (only "
                        "sleeps since the agent started are kept): use to_version=0 for the "
                        "bundle's own head")
                head = self._previous_heads.pop()
            elif to_version == 0:
                head = AdaptedHead.fresh(self.head, self.config.sleep.rank, self.config.seed)
                self._previous_heads.clear()
            else:
                match = [h for h in self._previous_heads if h.version == to_version]
                if not match:
                    have = [0] + [h.version for h in self._previous_heads]
                    raise InputError(f"to_version={to_version}: not in memory (have {have})")
                i = self._previous_heads.index(match[0])
                head = match[0]
                del self._previous_heads[i:]
            self.adapted_head = head
            log.info("adapter rolled back: version %d -> %d", current.version, head.version)
            self.checkpoint()
            return head.version

    def _keep_previous_head(self, head: AdaptedHead) -> None:
        """Called by an accepted sleep with the head it replaces (for `rollback_adapter`)."""
        self._previous_heads.append(head)
        del self._previous_heads[:-MAX_PREVIOUS_HEADS]

    # ------------------------------------------------------------------ persistence

    def checkpoint(self) -> int | None:
        """Write a checkpoint to the state directory (no-op without one); returns its number."""
        if self.state is None:
            return None
        with self._lock:
            arrays, files, info = snapshot(self)
            number = self.state.checkpoint(arrays, files, info)
            self._since_checkpoint = 0
            return number

    def save(self, directory: str | Path) -> int:
        """Checkpoint into `directory`: the learner's own state directory, or a new one."""
        if self.state is not None and Path(directory).resolve() == self.state.root.resolve():
            return self.checkpoint()
        with self._lock, StateDir(directory) as other:
            other.recover()
            arrays, files, info = snapshot(self)
            return other.checkpoint(arrays, files, info)

    def close(self) -> None:
        if self.state is not None:
            self.state.close()
            self.state = None

    def __enter__(self) -> Learner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        counts = self.memory.class_counts()
        return {"classes": list(self.classes), "episodes": len(self.memory),
                "capacity": self.config.capacity, "stored_total": self.n_stored,
                "per_class": {self.classes[i]: int(n) for i, n in enumerate(counts) if n},
                "novelty_threshold": self.novelty_threshold,
                "adapter_version": self.adapted_head.version,
                "head_classes": list(self.classes[: self.adapted_head.n_classes])}
