"""What a Learner writes to its state directory, and how it comes back.

Checkpoint = the memory's arrays (``mem__*``) + its hnswlib index file (``index.hnsw``,
verified by the store's sha256 before hnswlib reads it) + the associative readout
(``ro__weights``) + the sparse coder (``coder__*``) + the head's adapters once a sleep was
accepted (``adapter__A{i}``, ``adapter__B{i}``, ``adapter__N``, ``adapter__c``, with their
manifest in ``info["adapter"]``: format, version, rank, dims; see agent/sleep/adapters.py)
+ ``info`` (format, bundle id, the class list in index order, counters, novelty threshold,
the most recent label keys, the fusion's trust record). Log records: a stored episode
``{"kind": "episode", "label", "surprise", "ts", "key"?}`` + the latent; a labelled window
learned by the class statistics only ``{"kind": "observed", "label", "key"?}`` + the latent
(so the schema and a redelivered label's duplicate check survive a restart); from older
builds ``{"kind": "seen", "key"}``. Each may carry the readouts' test-then-train score
(``trust_p``, ``trust_hit``; agent/learner/trust.py).
A checkpoint of another bundle is refused: episodes are latents of *that* encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from agent.bundle import Bundle
from agent.errors import BundleError, StateError
from agent.memory import AssociativeReadout, EpisodicMemory, ReadoutConfig, SparseCoder
from agent.memory.schema import STATE_KEYS, check_stats
from agent.persist import LoadedCheckpoint, decode_record, encode_record
from agent.sleep import AdaptedHead

if TYPE_CHECKING:
    from agent.learner.learner import Learner

STATE_FORMAT = 1
INDEX_FILE = "index.hnsw"


CLASS_STATS = tuple(f"class_{k}" for k in STATE_KEYS)   # the schema's statistics, per class


def load_exemplars(bundle: Bundle, latent_dim: int) -> dict[str, np.ndarray]:
    """``exemplars.npz``: ``latents`` (n, d) f32, ``labels`` (n,) ints into the manifest's
    classes, ``latent_mean`` (d,) f32 (the mean training latent); in bundles exported since
    the schema readout, also the statistics of every training latent (`CLASS_STATS`):
    ``class_counts`` (K,) ints >= 1, ``class_means`` (K, d), ``class_scatter`` (d, d)
    floats (returned as float64). Older bundles lack them: the keys are then absent."""
    from agent.dataset import read_npz

    path = bundle.file("exemplars.npz")
    # The bytes load_bundle hashed (a file swapped on disk afterwards is never read);
    # plain arrays only, sizes checked before reading.
    z = read_npz(bundle.data("exemplars.npz"), BundleError, name=path)
    missing = [k for k in ("latents", "labels", "latent_mean") if k not in z]
    if missing:
        raise BundleError(f"{path}: not a readable exemplars file (no {missing})")
    out = {k: z[k] for k in ("latents", "labels", "latent_mean")}
    stats = {k: z[k] for k in CLASS_STATS if k in z}
    lat, lab, mean = out["latents"], out["labels"], out["latent_mean"]
    n_classes = len(bundle.classes)
    if lat.ndim != 2 or lat.shape[1] != latent_dim or lat.dtype != np.float32:
        raise BundleError(f"{path}: latents are {lat.dtype}{list(lat.shape)}, expected "
                          f"float32 [n, {latent_dim}]")
    if lab.shape != (lat.shape[0],) or lab.dtype.kind not in "iu" \
            or (lab.size and (lab.min() < 0 or lab.max() >= n_classes)):
        raise BundleError(f"{path}: labels must be ({lat.shape[0]},) ints in [0, {n_classes})")
    if mean.shape != (latent_dim,) or not np.isfinite(mean).all():
        raise BundleError(f"{path}: latent_mean must be finite ({latent_dim},)")
    if not np.isfinite(lat).all() or (np.linalg.norm(lat, axis=1) == 0).any():
        raise BundleError(f"{path}: latents must be finite and non-zero")
    out["labels"] = lab.astype(np.int64)
    if "novelty_calibration" in z:
        cal = z["novelty_calibration"]
        if cal.ndim != 2 or cal.shape[1] != 2 or cal.dtype.kind != "f" \
                or not np.isfinite(cal).all() or (cal < 0).any():
            raise BundleError(f"{path}: novelty_calibration is {cal.dtype}{list(cal.shape)}, "
                              "expected finite non-negative floats [n, 2]")
        out["novelty_calibration"] = cal.astype(np.float64)
    if stats:
        out.update(_class_stats(path, stats, n_classes, latent_dim))
    return out


def _class_stats(path, stats: dict[str, np.ndarray], n_classes: int,
                 latent_dim: int) -> dict[str, np.ndarray]:
    missing = [k for k in CLASS_STATS if k not in stats]
    if missing:
        raise BundleError(f"{path}: has {sorted(stats)} but not {missing}; the class "
                          f"statistics are {list(CLASS_STATS)}, all or none")
    counts, means, scatter = (stats[k] for k in CLASS_STATS)
    if counts.shape != (n_classes,) or counts.dtype.kind not in "iu":
        raise BundleError(f"{path}: class_counts is {counts.dtype}{list(counts.shape)}, "
                          f"expected ints [{n_classes}] (one per class of the manifest)")
    for name, a in (("class_means", means), ("class_scatter", scatter)):
        if a.dtype.kind != "f":
            raise BundleError(f"{path}: {name} is {a.dtype}, expected floats")
    problem = check_stats(counts, means, scatter, latent_dim)
    if problem:
        raise BundleError(f"{path}: class_{problem}")
    if (counts < 1).any():
        raise BundleError(f"{path}: class_counts must be >= 1 for every class, got "
                          f"{counts.tolist()}")
    return {"class_counts": counts.astype(np.int64),
            "class_means": means.astype(np.float64),
            "class_scatter": scatter.astype(np.float64)}


@dataclass(frozen=True)
class LearnerState:
    memory_arrays: dict[str, np.ndarray]
    index_path: object
    readout: dict[str, np.ndarray]
    coder: dict[str, np.ndarray]
    info: dict
    adapter: dict[str, np.ndarray]       # empty until a sleep was accepted

    @classmethod
    def from_checkpoint(cls, ck: LoadedCheckpoint) -> LearnerState:
        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in ck.arrays.items() if k.startswith(prefix)}

        if ck.info.get("format") != STATE_FORMAT:
            raise StateError(f"{ck.path}: learner state format {ck.info.get('format')!r}, "
                             f"this agent reads {STATE_FORMAT}")
        if INDEX_FILE not in ck.files:
            raise StateError(f"{ck.path}: checkpoint lacks {INDEX_FILE}")
        return cls(part("mem__"), ck.files[INDEX_FILE], part("ro__"), part("coder__"), ck.info,
                   part("adapter__"))

    @staticmethod
    def encode_episode(h: np.ndarray, label: str, surprise: float, ts: float,
                       key: str | None = None, *, trust=None) -> bytes:
        meta = {"kind": "episode", "label": label, "surprise": surprise, "ts": ts}
        if key is not None:
            meta["key_digest"] = key
        _put_trust(meta, trust)
        return encode_record(meta, {"h": np.ascontiguousarray(h, dtype=np.float32)})

    @staticmethod
    def encode_seen(key: str, *, trust=None) -> bytes:
        """(Older builds: a key learned without storing; replay still reads them.)"""
        meta = {"kind": "seen", "key": key}
        _put_trust(meta, trust)
        return encode_record(meta, {})

    @staticmethod
    def encode_observed(h: np.ndarray, label: str, key: str | None = None, *,
                        trust=None) -> bytes:
        """A labelled window learned by the class statistics only (no episode stored)."""
        meta = {"kind": "observed", "label": label}
        if key is not None:
            meta["key_digest"] = key
        _put_trust(meta, trust)
        return encode_record(meta, {"h": np.ascontiguousarray(h, dtype=np.float32)})

    @staticmethod
    def trust_of(meta: dict, n_readouts: int):
        """The readouts' test-then-train score a record carries: ``(p, hit, novelty)``
        (``trust_p``: each readout's probability of the label, ``trust_hit``: its argmax
        was right, ``novelty_raw``: the window's raw open-set scores if it calibrated
        them, else None), or None (a record from before the trust record, or one whose
        scores do not fit)."""
        p, hit = meta.get("trust_p"), meta.get("trust_hit")
        nov = meta.get("novelty_raw")
        if nov is not None and not (isinstance(nov, list) and len(nov) == 2 and all(
                isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
                for v in nov)):
            return None
        if not (isinstance(p, list) and isinstance(hit, list)
                and len(p) == len(hit) == n_readouts
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
                and all(isinstance(v, bool) for v in hit)):
            return None
        p_arr = np.asarray(p, np.float64)
        if not (np.isfinite(p_arr).all() and (p_arr >= 0).all() and (p_arr <= 1).all()):
            return None
        return p_arr, np.asarray(hit, bool), (None if nov is None else np.asarray(nov, float))

    @staticmethod
    def decode_record(payload: bytes) -> tuple[str, dict, dict]:
        """``(kind, meta, arrays)`` of a log record; StateError for an unknown kind."""
        meta, arrays = decode_record(payload)
        kind = meta.get("kind")
        if kind in ("episode", "observed") and "h" in arrays:
            return kind, meta, arrays
        if kind == "seen" and isinstance(meta.get("key"), str):
            return kind, meta, arrays
        raise StateError(f"log record of unknown kind {kind!r}: {sorted(meta)}")


def _put_trust(meta: dict, trust) -> None:
    if trust is not None:
        p, hit = trust[:2]
        meta["trust_p"] = [round(float(v), 6) for v in p]
        meta["trust_hit"] = [bool(v) for v in hit]
        if len(trust) > 2:
            meta["novelty_raw"] = [round(float(v), 6) for v in trust[2]]


def snapshot(learner: Learner) -> tuple[dict[str, np.ndarray], dict, dict]:
    """Arrays, file writers and info for `StateDir.checkpoint` (caller holds the lock)."""
    mem = learner.memory
    arrays = {f"mem__{k}": v for k, v in mem.state_arrays().items()}
    if learner.coder is not None and learner.readout is not None:
        arrays.update({f"ro__{k}": v for k, v in learner.readout.state_arrays().items()})
        arrays.update({f"coder__{k}": v for k, v in learner.coder.state_arrays().items()})
    info = {"format": STATE_FORMAT, "bundle_id": learner.bundle.bundle_id,
            "classes": list(learner.classes), "n_stored": learner.n_stored,
            "novelty_calibration": learner.novelty_cal.state(),
            "memory_config": _config_dict(mem.config), "sleeps": learner._n_sleeps,
            "seen_key_digests": list(learner._seen), "trust": learner.trust.state(),
            "max_adapter_version": learner.max_adapter_version}
    head = learner.adapted_head
    if head.version > 0:
        arrays.update({f"adapter__{k}": v for k, v in head.state_arrays().items()})
        info["adapter"] = head.manifest()
    return arrays, {INDEX_FILE: mem.save_index}, info


def _config_dict(cfg) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


def restore(learner: Learner, st: LearnerState) -> None:
    info = st.info
    if info.get("bundle_id") != learner.bundle.bundle_id:
        raise StateError(
            f"the state was learned on bundle {info.get('bundle_id')!r}, not on "
            f"{learner.bundle.bundle_id!r}: its episodes are latents of another encoder")
    classes = info.get("classes")
    base = list(learner.bundle.classes)
    if not isinstance(classes, list) or classes[: len(base)] != base:
        raise StateError(f"the state's classes {classes!r} do not extend the bundle's {base}")
    head = None
    if "adapter" in info:
        head = AdaptedHead.from_state(learner.head, st.adapter, info["adapter"])
        if head.n_classes > len(classes):
            raise StateError(f"the adapter outputs {head.n_classes} classes, the state "
                             f"lists {len(classes)}")
    from agent.memory import MemoryConfig

    cfg = MemoryConfig(**info["memory_config"])
    if cfg.capacity != learner.config.capacity or cfg.dim != learner.latent_dim:
        raise StateError(f"the state's memory has capacity {cfg.capacity} and dim {cfg.dim}; "
                         f"the config asks for {learner.config.capacity} and "
                         f"{learner.latent_dim}")
    # Sparse codes follow the state: a memory saved with codes keeps computing them (its
    # episodes carry them), one saved without (the default since issue 12) does not.
    if cfg.code_k:
        if not st.coder or not st.readout:
            raise StateError(f"the state's memory stores sparse codes (code_k={cfg.code_k}) "
                             "but the checkpoint has no coder/readout arrays")
        learner.coder = SparseCoder.from_state(st.coder)
        learner.readout = AssociativeReadout.from_state(
            ReadoutConfig(n_units=learner.coder.n_units, code_k=learner.coder.k), st.readout)
    else:
        learner.coder = learner.readout = None
    learner.memory = EpisodicMemory.from_state(cfg, st.memory_arrays, st.index_path)
    learner.classes = list(classes)
    learner._index = {c: i for i, c in enumerate(classes)}
    learner.n_stored = int(info.get("n_stored", 0))
    if "novelty_calibration" in info:   # older checkpoints: the bundle's calibration stays
        try:
            learner.novelty_cal.restore(info["novelty_calibration"])
        except StateError as exc:
            learner.recovery_warnings.append(f"{exc}; novelty calibration from the bundle")
    learner._n_sleeps = int(info.get("sleeps", 0))
    learner.max_adapter_version = int(info.get("max_adapter_version", 0))
    if "trust" in info:          # absent in checkpoints from before the trust record
        try:
            learner.trust.restore(info["trust"])
        except StateError as exc:  # a record of other readouts: start from the priors
            learner.recovery_warnings.append(f"{exc}; fusion weights start from the priors")
    learner._seen.clear()
    from agent.learner.learner import key_digest

    for digest in info.get("seen_key_digests", []):
        learner._remember(str(digest))
    for key in info.get("seen_keys", []):              # checkpoints of older builds
        learner._remember(key_digest(str(key)))
    if head is not None:
        learner.adapted_head = head
        learner.max_adapter_version = max(learner.max_adapter_version, head.version)
