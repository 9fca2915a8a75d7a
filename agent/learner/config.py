"""The learner's knobs: frozen dataclasses, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.errors import ConfigError
from agent.memory import SparseCoderConfig


@dataclass(frozen=True)
class SleepConfig:
    """How `Learner.sleep` consolidates the fast memory into adapters on the head
    (agent/sleep). Accuracies and drops are fractions (0.01 = 1 point)."""

    rank: int = 4                          # of each layer's B_i @ A_i (a restored adapter keeps its own)
    replay_samples: int = 10_000           # per sleep (real + pseudo), unless the budget ends first
    batch_size: int = 32
    lr: float = 3e-3                       # Adam
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0             # global L2 clipping; 0 turns it off
    distill_weight: float = 1.0            # of KL(pre-sleep head || head) on its classes
    distill_temperature: float = 2.0
    surprise_share: float = 0.5            # of replay drawn by surprise; the rest uniformly
    pseudo_below: int = 10                 # classes with fewer training episodes get pseudo-latents
    pseudo_share: float = 0.5              # of such a class's draws
    holdout_fraction: float = 0.2          # of each class's episodes, kept out of training
    min_held_out: int = 5                  # fewer held-out samples: no sleep (cannot validate)
    max_old_drop: float = 0.01             # gate: old classes may lose at most this accuracy
    max_overall_drop: float = 0.0          # gate: overall accuracy may fall at most this much
    # gate: no class with >= min_class_held_out held-out samples (the newest included)
    # may lose more than this accuracy; 1 turns the rule off.
    max_class_drop: float = 0.1
    min_class_held_out: int = 10
    forget_factor: float = 0.5             # strength of consolidated episodes is multiplied by it
    evict_below: float = 0.0               # then evict those below this strength (0: never)
    keep_per_class: int = 10               # eviction never leaves a class with fewer episodes
    checkpoint: bool = True                # checkpoint after an accepted sleep (with a state dir)

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise ConfigError(f"sleep.{name}={getattr(self, name)!r}, expected {expected}")

        def count(name: str, lo: int, hi: int = 2**31) -> None:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi, name,
                 f"an int in [{lo}, {hi}]")

        def unit(name: str, lo_open: bool = False) -> None:
            v = getattr(self, name)
            need(isinstance(v, int | float) and (0 < v <= 1 if lo_open else 0 <= v <= 1), name,
                 "within (0, 1]" if lo_open else "within [0, 1]")

        count("rank", 1, 256)
        count("replay_samples", 0)
        count("batch_size", 1, 4096)
        need(isinstance(self.lr, int | float) and 0 < self.lr <= 1, "lr", "0 < lr <= 1")
        need(0 <= self.beta1 < 1, "beta1", "within [0, 1)")
        need(0 <= self.beta2 < 1, "beta2", "within [0, 1)")
        need(0 < self.adam_eps < 1, "adam_eps", "0 < eps < 1")
        need(self.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0: no clipping)")
        need(self.distill_weight >= 0, "distill_weight", ">= 0")
        need(0 < self.distill_temperature <= 100, "distill_temperature", "0 < T <= 100")
        unit("surprise_share")
        count("pseudo_below", 0)
        unit("pseudo_share")
        need(0 <= self.holdout_fraction < 1, "holdout_fraction", "within [0, 1)")
        count("min_held_out", 1)
        unit("max_old_drop")
        unit("max_overall_drop")
        unit("max_class_drop")
        count("min_class_held_out", 1)
        unit("forget_factor")
        unit("evict_below")
        count("keep_per_class", 0)


@dataclass(frozen=True)
class LearnerConfig:
    """How the fast system learns and how its vote is fused with the bundle's head.

    Gating (predictive coding): a labelled window is stored when its surprise,
    ``1 - p(label)``, is at least ``surprise_threshold``; a confidently-correct one is
    stored with probability ``store_confident_rate`` (keeps class coverage).
    """

    capacity: int = 10_000                 # episodes the fast memory holds
    k_neighbors: int = 16                  # episodes retrieved per prediction
    readout: str = "max"                   # "max": per-class nearest episode; "vote": kNN vote
    center: bool = True                    # centre latents on the bundle's mean latent
    temperature: float = 0.02              # of the softmax over per-class similarities
    vote_power: float = 4.0                # "vote": a neighbour's vote is similarity ** power
    # Share of the associative readout in the fast vote. 0 by measurement: on digits it
    # changed 5-shot recall by < 1 point either way and costs ~15% of the predict path.
    assoc_weight: float = 0.0
    # k-WTA sparse codes of every stored latent (agent/memory/sparse.py). Off by
    # measurement (issue 12, docs/benchmarks.md): only the associative readout reads them,
    # and they cost more memory per episode than the float16 latent plus a coder matrix.
    # assoc_weight > 0 turns them on.
    sparse_codes: bool = False
    # Fusion (agent/learner/trust.py): the readouts head (with the kNN's mass for classes
    # it lacks), knn and schema are pooled linearly with weights learned test-then-train
    # on this device's labelled windows ("prequential"), or fixed at the priors below
    # ("fixed"). Priors are relative (normalised); 0 turns a readout off.
    fusion: str = "prequential"
    head_weight: float = 1.0
    knn_weight: float = 1.0
    schema_weight: float = 1.0
    pool_weight: float = 1.0               # prior of the fixed pool of the three
    # The record each readout is weighted by: "hit" (its argmax was the label) or "log"
    # (log-score of the label). "hit" with eta 1 by measurement (bench cl, issue 12,
    # docs/benchmarks.md): the log-score favours the pool, which is better calibrated but
    # less accurate (pigcvp 84.2 vs 97.9 %, osuleaf 75.5 vs 83.0 % with "hit", digits 96.5
    # vs 96.9 %, seed 0, no sleep).
    fusion_eta: float = 1.0                # learning rate of the exponential weights
    fusion_score: str = "hit"
    fusion_decay: float = 0.99             # per labelled window: a ~100-window memory
    schema_temperature: float = 1.0        # of its softmax over the LDA scores
    surprise_threshold: float = 0.5
    store_confident_rate: float = 0.05
    # Always store until a class holds this many: the surprise gate alone kept the memory
    # mostly empty (127 of 717 stream windows on digits); 80 lifted `bench cl` digits ACC
    # from 89.4-93.8 % to 95.6-95.9 % over seeds 0-2 (docs/benchmarks.md).
    min_class_episodes: int = 80
    # Open set (agent/learner/novelty.py): the false-alarm rate the novelty flag is
    # calibrated to on known classes, how many known-class windows calibrate it, and how
    # many observations make a class "known" for calibration.
    novelty_fa: float = 0.05
    novelty_calibration: int = 256
    novelty_min_class: int = 10
    exemplars_per_class: int = 20          # bundle exemplars seeded into memory per class
    # Quotas on classes created by labels (the bundle's count against max_classes); a
    # label beyond either is refused with an InputError naming the quota.
    max_classes: int = 256
    max_new_classes_per_hour: int = 64
    latent_dtype: str = "float16"
    sparse: SparseCoderConfig = field(default_factory=SparseCoderConfig)
    sleep: SleepConfig = field(default_factory=SleepConfig)
    use_sae: bool = True                   # the bundle's sparse autoencoder, when it has one
    ef_search: int = 32                    # hnswlib; recall@10 0.99 at 100k (bench memory)
    threads: int = 1                       # onnxruntime intra-op threads
    durable: bool = True                   # fsync the log before learn_one returns
    checkpoint_every: int = 1000           # learned episodes between automatic checkpoints
    seed: int = 0

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise ConfigError(f"learner.{name}={getattr(self, name)!r}, expected {expected}")

        need(isinstance(self.capacity, int) and self.capacity >= 1, "capacity", "an int >= 1")
        need(isinstance(self.k_neighbors, int) and self.k_neighbors >= 1, "k_neighbors",
             "an int >= 1")
        need(self.readout in ("max", "vote"), "readout", "'max' or 'vote'")
        need(0 < self.temperature <= 10, "temperature", "0 < temperature <= 10")
        need(0 < self.vote_power <= 64, "vote_power", "0 < power <= 64")
        need(0 <= self.assoc_weight <= 1, "assoc_weight", "0 <= weight <= 1")
        for name in ("head_weight", "knn_weight", "schema_weight", "pool_weight"):
            v = getattr(self, name)
            need(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1,
                 name, "0 <= weight <= 1")
        need(self.head_weight + self.knn_weight + self.schema_weight > 0, "head_weight",
             "a positive weight on at least one of head/knn/schema_weight")
        need(self.fusion in ("prequential", "fixed"), "fusion", "'prequential' or 'fixed'")
        need(self.fusion_score in ("log", "hit"), "fusion_score", "'log' or 'hit'")
        need(isinstance(self.fusion_eta, int | float) and 0 <= self.fusion_eta <= 100,
             "fusion_eta", "0 <= eta <= 100")
        need(isinstance(self.fusion_decay, int | float) and 0 < self.fusion_decay <= 1,
             "fusion_decay", "0 < decay <= 1")
        need(isinstance(self.sparse_codes, bool), "sparse_codes", "true or false")
        need(isinstance(self.schema_temperature, int | float)
             and 0 < self.schema_temperature <= 1e6, "schema_temperature",
             "0 < temperature <= 1e6")
        need(0 <= self.surprise_threshold <= 1, "surprise_threshold", "within [0, 1]")
        need(0 <= self.store_confident_rate <= 1, "store_confident_rate", "within [0, 1]")
        need(isinstance(self.min_class_episodes, int) and self.min_class_episodes >= 0,
             "min_class_episodes", "an int >= 0")
        need(isinstance(self.max_classes, int) and 2 <= self.max_classes <= 2**20,
             "max_classes", "an int in [2, 2**20]")
        need(isinstance(self.max_new_classes_per_hour, int)
             and self.max_new_classes_per_hour >= 0, "max_new_classes_per_hour", "an int >= 0")
        need(isinstance(self.novelty_fa, int | float) and 0 < self.novelty_fa < 1,
             "novelty_fa", "0 < rate < 1")
        need(isinstance(self.novelty_calibration, int) and self.novelty_calibration >= 2,
             "novelty_calibration", "an int >= 2")
        need(isinstance(self.novelty_min_class, int) and self.novelty_min_class >= 0,
             "novelty_min_class", "an int >= 0")
        need(isinstance(self.exemplars_per_class, int) and self.exemplars_per_class >= 0,
             "exemplars_per_class", "an int >= 0")
        need(self.latent_dtype in ("float16", "float32"), "latent_dtype",
             "'float16' or 'float32'")
        need(isinstance(self.ef_search, int) and self.ef_search >= 1, "ef_search", "an int >= 1")
        need(isinstance(self.threads, int) and self.threads >= 1, "threads", "an int >= 1")
        need(isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 1,
             "checkpoint_every", "an int >= 1")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", "an int >= 0")
