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

import hashlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.bundle import Bundle, load_bundle
from agent.errors import BundleError, InputError, ReverieError
from agent.head import Head
from agent.inference import Encoder, softmax
from agent.learner import fusion, kernels
from agent.learner.config import LearnerConfig
from agent.learner.novelty import NoveltyCalibration
from agent.learner.state import LearnerState, restore, snapshot
from agent.learner.trust import READOUTS, ReadoutTrust
from agent.memory import (
    AssociativeReadout,
    EpisodicMemory,
    MemoryConfig,
    MemoryInputError,
    ReadoutConfig,
    SparseCoder,
)
from agent.persist import StateDir
from agent.sleep import AdaptedHead, SleepReport

log = logging.getLogger("reverie.learner")
MAX_LABEL_CHARS = 64
MAX_SEEN_KEYS = 20_000   # label keys remembered for deduplication (checkpointed)
MAX_PREVIOUS_HEADS = 3   # earlier adapters kept in memory for `rollback_adapter`
# A caller's timestamp may run ahead of the agent's clock by this much; beyond, the agent's
# clock is used (a device's ts=1e300 must not make its episodes outlive every later one).
MAX_CLOCK_SKEW_S = 300.0


def key_digest(key: str) -> str:
    """The form a label key is remembered in: 32 hex digits of its SHA-256 (UTF-8)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
_DECIDED = ("slow", "agree", "fast")


@dataclass(frozen=True)
class Prediction:
    label: str
    probs: np.ndarray            # (K,) over `classes`
    classes: tuple[str, ...]
    confidence: float
    decided_by: str              # "slow" (head), "fast" (memory), "agree"
    novelty: bool                # unlike every known class (agent/learner/novelty.py)
    novelty_score: float         # 1 - conformal p-value; flagged at >= 1 - novelty_fa
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
        # Digests of the label keys already learned, oldest first (`key_digest`: a hostile
        # key of 256 emoji costs 32 bytes here and in a checkpoint, like any other).
        self._seen: dict[str, None] = {}
        self.head = Head.from_bundle(bundle)        # frozen base, from the hashed bytes
        # The slow system predictions use; replaced (never mutated) by an accepted sleep.
        self.adapted_head = AdaptedHead.fresh(self.head, config.sleep.rank, config.seed)
        self._sleep_lock = threading.Lock()
        self._previous_heads: list[AdaptedHead] = []
        self._n_sleeps = 0
        self.max_adapter_version = 0      # versions never repeat, rollbacks included
        self.latent_dim = self.encoder.latent_dim
        self.classes: list[str] = list(bundle.classes)
        self._index = {c: i for i, c in enumerate(self.classes)}
        self._lock = threading.RLock()
        self._rng = np.random.default_rng(config.seed)
        self.n_stored = 0                 # episodes learned since creation (incl. replayed)
        self._since_checkpoint = 0
        # Open-set calibration: known-class scores of this device's labelled windows.
        self.novelty_cal = NoveltyCalibration(config.novelty_fa, config.novelty_calibration)
        # Which readout to trust, learned on this device's labels (test-then-train).
        self.trust = ReadoutTrust((config.head_weight, config.knn_weight, config.schema_weight,
                                   config.pool_weight),
                                  eta=config.fusion_eta, decay=config.fusion_decay,
                                  score=config.fusion_score)
        self._pool_prior = np.array([config.head_weight, config.knn_weight,
                                     config.schema_weight], np.float64)
        exemplars = self._exemplars = self._load_exemplars()   # sleep replays them too
        # The memory compares latents centred on the mean training latent: non-negative
        # (post-ReLU) latents share a dominant direction that swamps cosine similarity.
        self.center = (exemplars["latent_mean"] if exemplars is not None and config.center
                       else np.zeros(self.latent_dim, np.float32))
        # Sparse codes only when something reads them (see LearnerConfig.sparse_codes).
        self.coder: SparseCoder | None = (self._make_coder(exemplars)
                                          if config.sparse_codes or config.assoc_weight
                                          else None)
        code_k = self.coder.k if self.coder is not None else 0
        self.memory = EpisodicMemory(MemoryConfig(
            capacity=config.capacity, dim=self.latent_dim, code_k=code_k,
            ef_search=config.ef_search, latent_dtype=config.latent_dtype, seed=config.seed))
        self.readout: AssociativeReadout | None = (
            AssociativeReadout(ReadoutConfig(n_units=self.coder.n_units, code_k=code_k))
            if self.coder is not None else None)
        self.state: StateDir | None = None
        self.recovery_warnings: list[str] = []
        self.replay_skipped = 0           # log records that could not be applied at start
        self._new_class_times: deque[float] = deque()   # monotonic times of new classes
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
            for seq, payload in rec.records:
                try:
                    self._replay(payload)
                except (ReverieError, MemoryInputError, ValueError, TypeError,
                        KeyError) as exc:
                    # A record this build cannot apply never stops the agent from starting:
                    # skipped, counted and reported (nothing after it is lost).
                    self.replay_skipped += 1
                    msg = f"log record {seq} skipped: {exc}"
                    self.recovery_warnings.append(msg)
                    log.warning("state recovery: %s", msg)
            if rec.records:
                log.info("replayed %d logged record(s), %d skipped", len(rec.records),
                         self.replay_skipped)
        else:
            self._seed(exemplars)

    def _replay(self, payload: bytes) -> None:
        """Apply one write-ahead-log record (start-up); raises if it cannot be applied."""
        kind, meta, arrays = LearnerState.decode_record(payload)
        if kind in ("episode", "observed"):
            h = self._latents(np.asarray(arrays["h"])[None])[0]
            label = meta.get("label")
            self._check_label(label)
            self.memory.check_latent(h - self.center, store=kind == "episode")
            if kind == "episode":
                self._apply(h, label, float(meta["surprise"]), float(meta["ts"]))
            else:
                idx, _ = self._class_index(label)
                self.memory.observe(h - self.center, idx)
        if isinstance(meta.get("key_digest"), str):
            self._remember(meta["key_digest"])
        elif meta.get("key") is not None:                 # a record of an older build
            self._remember(key_digest(str(meta["key"])))
        scored = LearnerState.trust_of(meta, len(READOUTS))
        if scored is not None:
            self.trust.update(*scored[:2])
            if scored[2] is not None:
                self.novelty_cal.add(scored[2])

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
            from agent.dataset import read_npz

            z = read_npz(self.bundle.data("sae.npz"), BundleError,
                         name=self.bundle.file("sae.npz"))
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
        codes = self.sparse_codes(lat)
        for h, code, y in zip(lat, codes, lab, strict=True):
            self.memory.add(h - self.center, code, int(y), surprise=0.0, ts=0.0)
            if self.readout is not None:
                self.readout.learn(code, int(y))
        if has_stats:   # statistics are shift-invariant but the means: centre them too
            self.memory.schema.seed_stats(exemplars["class_counts"],
                                          exemplars["class_means"] - self.center,
                                          exemplars["class_scatter"])
        if "novelty_calibration" in exemplars:
            # The exporter's held-out windows, scored as this device scores (novelty.py).
            self.novelty_cal.reset(exemplars["novelty_calibration"])
        elif len(lat) >= 2:    # older bundles: the stored exemplars, leave-one-out
            u = lat - self.center
            u = u / np.linalg.norm(u, axis=1, keepdims=True)
            d = 1.0 - u @ u.T
            np.fill_diagonal(d, np.inf)
            _, d2 = self.memory.schema.class_distances(lat - self.center, leave_out=lab)
            self.novelty_cal.reset(np.stack([d.min(axis=1), d2.min(axis=1)], axis=1))

    @property
    def novelty_threshold(self) -> float:
        """`Prediction.novelty_score` at or above which a window is flagged novel."""
        return self.novelty_cal.threshold

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

    @staticmethod
    def _check_label(label) -> None:
        if not isinstance(label, str) or not label or len(label) > MAX_LABEL_CHARS \
                or not label.isprintable():
            raise InputError(f"label {label!r}: expected a printable string of 1-"
                             f"{MAX_LABEL_CHARS} characters")

    def _check_class_quota(self, label: str) -> None:
        """Refuse a new class beyond ``max_classes`` or ``max_new_classes_per_hour`` (on the
        agent's monotonic clock): one sender must not grow every prediction, the status and
        the memory without bound."""
        cfg = self.config
        if len(self.classes) >= cfg.max_classes:
            raise InputError(f"label {label!r}: would be class {len(self.classes) + 1}, above "
                             f"learner.max_classes={cfg.max_classes}; refused")
        now = time.monotonic()
        recent = self._new_class_times
        while recent and recent[0] <= now - 3600.0:
            recent.popleft()
        if len(recent) >= cfg.max_new_classes_per_hour:
            raise InputError(f"label {label!r}: {len(recent)} new classes in the last hour, "
                             f"learner.max_new_classes_per_hour="
                             f"{cfg.max_new_classes_per_hour}; refused")
        recent.append(now)

    def _class_index(self, label) -> tuple[int, bool]:
        self._check_label(label)
        idx = self._index.get(label)
        if idx is not None:
            return idx, False
        self.classes.append(label)
        self._index[label] = len(self.classes) - 1
        log.info("new class %r (index %d)", label, len(self.classes) - 1)
        return len(self.classes) - 1, True

    # ------------------------------------------------------------------ predict

    def _readouts(self, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every readout's class distribution for a batch of latents (B, d): ``P`` (R, B, K)
        in `READOUTS` order (a row of zeros: the readout knows nothing yet), the bare
        head's ``p_head`` (B, Kh) and the raw open-set scores (B, 2): the nearest
        episode's cosine distance and the schema's `distance` (agent/learner/novelty.py).

        * head: the slow system. It knows only its own classes (the bundle's, then those
          consolidated by sleep), so the kNN readout decides how much mass goes to the
          others and the head splits the rest among its own (`fusion.fuse`).
        * knn: per class its nearest episode's similarity, softmax (`fusion.max_similarity_*`).
        * pool: the three above pooled with their prior weights (``head/knn/schema_weight``).
        * schema: the memory's class means + shared covariance (streaming LDA). It speaks
          for a class from its first example (the shared covariance carries it; before
          issue 12 it abstained below 10 examples, which cost pigcvp's 2-per-class classes
          their best readout); the trust weights decide how much it is heard.
        """
        cfg = self.config
        head = self.adapted_head          # one read: a concurrent sleep may swap it
        p_head = softmax(head.logits(latents).astype(np.float64))            # (B, Kh)
        n_classes = len(self.classes)
        centred = latents - self.center                                      # (B, d)
        labels, dist = self.memory.neighbours(centred, cfg.k_neighbors)      # (B, k)
        P = np.zeros((len(READOUTS), latents.shape[0], n_classes))           # (R, B, K)
        if cfg.readout == "max" and not cfg.assoc_weight:   # the fast path: one kernel
            P[0], _, P[1] = kernels.fuse_max_similarity(labels, dist, p_head, n_classes,
                                                        cfg.temperature)
        else:
            if cfg.readout == "max":
                knn = fusion.max_similarity_batch(labels, dist, n_classes, cfg.temperature)
            else:
                knn = np.stack([fusion.knn_scores(lb, d, n_classes, cfg.vote_power)
                                for lb, d in zip(labels, dist, strict=True)])
            if cfg.assoc_weight and self.readout is not None:
                codes = self.sparse_codes(latents)                           # (B, k_active)
                assoc = self.readout.scores_batch(codes)                     # (B, K')
                knn = np.stack([fusion.mix_fast(kn, a, cfg.assoc_weight)
                                for kn, a in zip(knn, assoc, strict=True)])
            P[0], _ = fusion.fuse_batch(p_head, knn)
            P[1] = knn
        p_schema, schema_dist = self.memory.schema_posterior_and_distance(
            centred, n_classes, cfg.schema_temperature)                      # (B, K), (B,)
        if cfg.schema_weight > 0:
            P[2] = p_schema
        P[3], _ = fusion.mix_readouts(P[:3], self._pool_prior, p_head)
        raw = np.stack([dist[:, 0].astype(np.float64) if dist.shape[1]
                        else np.full(latents.shape[0], np.inf), schema_dist], axis=1)  # (B, 2)
        return P, p_head, raw

    def _fusion_weights(self) -> np.ndarray:
        return self.trust.weights() if self.config.fusion == "prequential" else self.trust.prior

    def _predict_latents(self, latents: np.ndarray, t0: float) -> list[Prediction]:
        """Every readout on a batch of latents (B, d), pooled with the trust weights."""
        P, p_head, raw = self._readouts(latents)
        probs, who = fusion.mix_readouts(P, self._fusion_weights(), p_head)  # (B, K)
        return self._predictions(probs, who, raw, t0)

    def readout_probs(self, windows) -> dict[str, np.ndarray]:
        """Each readout's class distribution and the fused one for a batch of windows
        (B, *input_shape): ``{"head", "knn", "schema", "fused"}`` -> (B, K) over
        `classes` (a readout that knows nothing yet gives rows of zeros). For measuring
        what the fusion adds (``reverie bench cl``); `predict_many` returns "fused"."""
        x = self._windows(windows, single=False)
        K = len(self.classes)
        if not len(x):
            return {n: np.zeros((0, K)) for n in (*READOUTS, "fused")}
        P, p_head, _ = self._readouts(self.encoder.encode(x))
        out = dict(zip(READOUTS, P, strict=True))
        out["fused"], _ = fusion.mix_readouts(P, self._fusion_weights(), p_head)
        return out

    def novelty_raw(self, windows) -> np.ndarray:
        """The raw open-set scores (B, 2) (nearest episode's cosine distance, the schema's
        Mahalanobis distance per dimension) of a batch of windows, before calibration."""
        x = self._windows(windows, single=False)
        if not len(x):
            return np.zeros((0, 2))
        return self._readouts(self.encoder.encode(x))[2]

    def _predictions(self, probs, who, raw, t0) -> list[Prediction]:
        novelty = self.novelty_cal.novelty(raw)                              # (B,)
        best = probs.argmax(axis=1)
        latency = (time.perf_counter() - t0) * 1e6 / len(probs)
        classes = tuple(self.classes)
        thr = self.novelty_cal.threshold - 1e-12
        return [Prediction(classes[b], p, classes, float(p[b]), w, nv >= thr, nv, latency)
                for b, p, w, nv in zip(best.tolist(), probs, who, novelty.tolist(), strict=True)]

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
        return key_digest(key) in self._seen

    def _remember(self, digest: str) -> None:
        self._seen[digest] = None
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
        now = time.time()
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float)
                               or not math.isfinite(ts)):
            raise InputError(f"ts={ts!r}: expected a finite number of seconds")
        # Retention is scored on the agent's clock: a caller may date a window back, never
        # beyond the agent's own now (+ MAX_CLOCK_SKEW_S).
        ts = now if ts is None else min(float(ts), now + MAX_CLOCK_SKEW_S)
        if key is not None and (not isinstance(key, str) or not key or len(key) > 256):
            raise InputError(f"label key {key!r}: expected a string of 1-256 characters")
        self._check_label(label)
        try:   # everything the memory would refuse, refused before anything is logged
            self.memory.check_latent(h[0] - self.center, store=True)
        except MemoryInputError as exc:
            raise InputError(f"latent cannot be learned: {exc}") from None
        with self._lock:
            digest = None if key is None else key_digest(key)
            if digest is not None and digest in self._seen:
                return LearnResult(False, 0.0, False, None, None, duplicate=True)
            if label not in self._index:
                self._check_class_quota(label)
            idx, new_class = self._class_index(label)
            P, p_head, raw = self._readouts(h)                               # test ...
            probs, who = fusion.mix_readouts(P, self._fusion_weights(), p_head)
            pred = self._predictions(probs, who, raw, t0)[0]
            scored = None
            if not new_class:                  # ... then train: no readout could know a new one
                has = P[:, 0].sum(axis=1) > 0                               # (R,)
                scored = (P[:, 0, idx], has & (P[:, 0].argmax(axis=1) == idx))
                self.trust.update(*scored)
                if self.memory.schema_counts(idx + 1)[idx] >= self.config.novelty_min_class:
                    scored = (*scored, raw[0])          # a known class: calibrates novelty
                    self.novelty_cal.add(raw[0])
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
                    self.state.log(LearnerState.encode_episode(h[0], label, surprise, ts,
                                                               digest, trust=scored),
                                   durable=self.config.durable)
                eid = self._apply(h[0], label, surprise, ts)
                self._since_checkpoint += 1
            else:
                # Not stored as an episode, but the schema (class statistics) learns every
                # labelled window, and a redelivery after a crash must not store it: logged.
                if self.state is not None:
                    self.state.log(LearnerState.encode_observed(h[0], label, digest,
                                                                trust=scored),
                                   durable=self.config.durable)
                self.memory.observe(h[0] - self.center, idx)
            if digest is not None:
                self._remember(digest)
            if store and self.state is not None \
                    and self._since_checkpoint >= self.config.checkpoint_every:
                self.checkpoint()
        return LearnResult(store, surprise, new_class, eid, pred)

    def _apply(self, h: np.ndarray, label: str, surprise: float, ts: float) -> int:
        idx, _ = self._class_index(label)
        code = self.sparse_codes(h[None])[0]
        eid = self.memory.add(h - self.center, code, idx, surprise=surprise, ts=ts)
        if self.readout is not None:
            self.readout.learn(code, idx)
        self.n_stored += 1
        return eid

    def sparse_codes(self, latents: np.ndarray) -> np.ndarray:
        """The k-WTA codes the memory stores with latents (B, d): (B, code_k) int32, with
        code_k = 0 when sparse codes are off (the default: `LearnerConfig.sparse_codes`)."""
        if self.coder is None:
            return np.zeros((latents.shape[0], 0), np.int32)
        return self.coder.encode(latents)

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
                    have = sorted({0} | {h.version for h in self._previous_heads})
                    raise InputError(f"to_version={to_version}: not in memory (current version "
                                     f"{current.version}; earlier ones kept: {have}; 0 is the "
                                     "bundle's head)")
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

    def sync(self) -> None:
        """Make every log record written so far durable (one fsync): the group commit of
        a caller that learns with ``durable=False`` (the daemon, per label message)."""
        if self.state is not None:
            self.state.sync()

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
                "novelty_calibration": len(self.novelty_cal),
                "adapter_version": self.adapted_head.version,
                "head_classes": list(self.classes[: self.adapted_head.n_classes]),
                "fusion": {"mode": self.config.fusion, **self.trust.summary()}}
