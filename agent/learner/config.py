"""The learner's knobs: one frozen dataclass, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.errors import ConfigError
from agent.memory import SparseCoderConfig


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
    surprise_threshold: float = 0.5
    store_confident_rate: float = 0.05
    min_class_episodes: int = 10           # always store until a class holds this many
    novelty_quantile: float = 0.99         # of seed exemplars' 1-NN distances -> threshold
    novelty_margin: float = 1.5            # threshold = margin * that quantile
    exemplars_per_class: int = 20          # bundle exemplars seeded into memory per class
    latent_dtype: str = "float16"
    sparse: SparseCoderConfig = field(default_factory=SparseCoderConfig)
    use_sae: bool = True                   # the bundle's sparse autoencoder, when it has one
    ef_search: int = 64
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
        need(0 <= self.surprise_threshold <= 1, "surprise_threshold", "within [0, 1]")
        need(0 <= self.store_confident_rate <= 1, "store_confident_rate", "within [0, 1]")
        need(isinstance(self.min_class_episodes, int) and self.min_class_episodes >= 0,
             "min_class_episodes", "an int >= 0")
        need(0 < self.novelty_quantile <= 1, "novelty_quantile", "within (0, 1]")
        need(self.novelty_margin > 0, "novelty_margin", "> 0")
        need(isinstance(self.exemplars_per_class, int) and self.exemplars_per_class >= 0,
             "exemplars_per_class", "an int >= 0")
        need(self.latent_dtype in ("float16", "float32"), "latent_dtype",
             "'float16' or 'float32'")
        need(isinstance(self.ef_search, int) and self.ef_search >= 1, "ef_search", "an int >= 1")
        need(isinstance(self.threads, int) and self.threads >= 1, "threads", "an int >= 1")
        need(isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 1,
             "checkpoint_every", "an int >= 1")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", "an int >= 0")
