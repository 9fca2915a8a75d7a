"""What a Learner writes to its state directory, and how it comes back.

Checkpoint = the memory's arrays (``mem__*``) + its hnswlib index file (``index.hnsw``,
verified by the store's sha256 before hnswlib reads it) + the associative readout
(``ro__weights``) + the sparse coder (``coder__*``) + the head's adapters once a sleep was
accepted (``adapter__A{i}``, ``adapter__B{i}``, ``adapter__N``, ``adapter__c``, with their
manifest in ``info["adapter"]``: format, version, rank, dims; see agent/sleep/adapters.py)
+ ``info`` (format, bundle id, the class list in index order, counters, novelty threshold). Log record = one stored episode:
``{"kind": "episode", "label", "surprise", "ts"}`` + the latent.
A checkpoint of another bundle is refused: episodes are latents of *that* encoder.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from agent.bundle import Bundle
from agent.errors import BundleError, StateError
from agent.memory import AssociativeReadout, EpisodicMemory, ReadoutConfig, SparseCoder
from agent.persist import LoadedCheckpoint, decode_record, encode_record
from agent.sleep import AdaptedHead

if TYPE_CHECKING:
    from agent.learner.learner import Learner

STATE_FORMAT = 1
INDEX_FILE = "index.hnsw"


def load_exemplars(bundle: Bundle, latent_dim: int) -> dict[str, np.ndarray]:
    """``exemplars.npz``: ``latents`` (n, d) f32, ``labels`` (n,) ints into the manifest's
    classes, ``latent_mean`` (d,) f32 (the mean training latent)."""
    path = bundle.file("exemplars.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("latents", "labels", "latent_mean")}
    except (KeyError, OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BundleError(f"{path}: not a readable exemplars file ({exc})") from None
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
    return out


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
    def encode_episode(h: np.ndarray, label: str, surprise: float, ts: float) -> bytes:
        return encode_record({"kind": "episode", "label": label, "surprise": surprise, "ts": ts},
                             {"h": np.ascontiguousarray(h, dtype=np.float32)})

    @staticmethod
    def decode_episode(payload: bytes) -> tuple[np.ndarray, str, float, float]:
        meta, arrays = decode_record(payload)
        if meta.get("kind") != "episode" or "h" not in arrays:
            raise StateError(f"log record is not an episode: {sorted(meta)}")
        return arrays["h"], str(meta["label"]), float(meta["surprise"]), float(meta["ts"])


def snapshot(learner: Learner) -> tuple[dict[str, np.ndarray], dict, dict]:
    """Arrays, file writers and info for `StateDir.checkpoint` (caller holds the lock)."""
    mem = learner.memory
    arrays = {f"mem__{k}": v for k, v in mem.state_arrays().items()}
    arrays.update({f"ro__{k}": v for k, v in learner.readout.state_arrays().items()})
    arrays.update({f"coder__{k}": v for k, v in learner.coder.state_arrays().items()})
    info = {"format": STATE_FORMAT, "bundle_id": learner.bundle.bundle_id,
            "classes": list(learner.classes), "n_stored": learner.n_stored,
            "novelty_threshold": learner.novelty_threshold,
            "memory_config": _config_dict(mem.config), "sleeps": learner._n_sleeps}
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
    learner.coder = SparseCoder.from_state(st.coder)
    learner.memory = EpisodicMemory.from_state(cfg, st.memory_arrays, st.index_path)
    learner.readout = AssociativeReadout.from_state(
        ReadoutConfig(n_units=learner.coder.n_units, code_k=learner.coder.k), st.readout)
    learner.classes = list(classes)
    learner._index = {c: i for i, c in enumerate(classes)}
    learner.n_stored = int(info.get("n_stored", 0))
    learner.novelty_threshold = info.get("novelty_threshold")
    learner._n_sleeps = int(info.get("sleeps", 0))
    if head is not None:
        learner.adapted_head = head
