"""`SleepReport`: what one consolidation did, for logs, events and benchmarks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Accuracy:
    """Accuracy on the held-out slice; None where the slice holds no such episode.

    ``old``: classes the head knew before this sleep; ``new``: classes it learns in it;
    ``per_class``: every class in the slice (what the per-class rule of the gate judges).
    """

    old: float | None
    new: float | None
    all: float | None
    n_old: int
    n_new: int
    per_class: dict[str, float] = field(default_factory=dict)   # class name -> accuracy
    per_class_n: dict[str, int] = field(default_factory=dict)   # class name -> samples


@dataclass(frozen=True)
class SleepReport:
    """Outcome of `Learner.sleep`.

    ``accepted`` says whether the new adapter replaced the old one; when not, ``reason``
    says why (``"preempted"``, the gate's failed rule with numbers, ``"busy"``, ...).
    Accuracies are of the whole learner (head fused with the fast memory, whose
    neighbours are the training episodes only) before and after, on the held-out slice.
    """

    accepted: bool
    reason: str
    duration_s: float
    samples_replayed: int = 0       # real + pseudo samples through the training step
    pseudo_samples: int = 0         # drawn from per-class latent statistics
    steps: int = 0                  # mini-batches
    episodes_train: int = 0         # stored episodes the replay drew from
    episodes_held_out: int = 0      # gate slice: held-out episodes + bundle exemplars
    acc_before: Accuracy | None = None
    acc_after: Accuracy | None = None
    loss_first: float | None = None  # mean loss of the first and last few mini-batches
    loss_last: float | None = None
    episodes_decayed: int = 0       # strength multiplied by the forgetting factor
    episodes_evicted: int = 0       # strength fell below the eviction floor
    adapter_version: int = 0        # the version in place when the sleep ended
    head_classes: tuple[str, ...] = field(default_factory=tuple)  # the head's outputs after
    preempted: bool = False

    def to_dict(self) -> dict:
        """JSON-ready (events topic, bench output)."""
        out = asdict(self)
        out["head_classes"] = list(self.head_classes)
        return out
