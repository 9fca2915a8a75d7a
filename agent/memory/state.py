"""The episodic memory's arrays: their names, shapes and dtypes, and loud validation of saved state.

`EpisodicMemory.state_arrays()` returns `STATE_FIELDS` plus the schema readout's
`SCHEMA_FIELDS`; `validate_state` checks a dict read back from disk against a
`MemoryConfig` before anything trusts it, so a truncated, mismatched or hand-edited
checkpoint fails with the field and value named. The schema fields are optional (state
written before the schema readout existed): without them the schema is rebuilt from the
stored episodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.memory.config import MemoryConfig
from agent.memory.errors import MemoryStateError
from agent.memory.schema import STATE_KEYS


def expected_fields(config: MemoryConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    cap = config.capacity
    return {
        "latents": ((cap, config.dim), np.dtype(config.latent_dtype)),   # raw latents (not normalized)
        "codes": ((cap, config.code_k), np.dtype(np.int32)),             # ascending unit ids per row
        "labels": ((cap,), np.dtype(np.int32)),
        "surprise": ((cap,), np.dtype(np.float32)),
        "created_ts": ((cap,), np.dtype(np.float64)),
        "last_access_ts": ((cap,), np.dtype(np.float64)),
        "replay_count": ((cap,), np.dtype(np.int32)),
        "strength": ((cap,), np.dtype(np.float32)),
        "valid": ((cap,), np.dtype(np.bool_)),
        "episode_ids": ((cap,), np.dtype(np.uint64)),                     # seq * capacity + slot
        "next_seq": ((), np.dtype(np.uint64)),                            # adds so far
    }


STATE_FIELDS = tuple(expected_fields(MemoryConfig()).keys())
SCHEMA_FIELDS = tuple(f"schema_{k}" for k in STATE_KEYS)   # the schema readout's arrays


@dataclass(frozen=True)
class Episodes:
    """A copy of some stored episodes, row i describing ``ids[i]``."""

    ids: np.ndarray              # (n,) uint64
    latents: np.ndarray          # (n, dim) float16 | float32, as stored
    codes: np.ndarray            # (n, code_k) int32
    labels: np.ndarray           # (n,) int32
    surprise: np.ndarray         # (n,) float32
    created_ts: np.ndarray       # (n,) float64 s
    last_access_ts: np.ndarray   # (n,) float64 s
    replay_count: np.ndarray     # (n,) int32
    strength: np.ndarray         # (n,) float32

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def validate_state(config: MemoryConfig, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check `arrays` against `config` and itself; return C-contiguous, writeable copies."""
    expected = expected_fields(config)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected) - set(SCHEMA_FIELDS))
    schema = [f for f in SCHEMA_FIELDS if f in arrays]
    if schema and len(schema) != len(SCHEMA_FIELDS):
        missing += sorted(set(SCHEMA_FIELDS) - set(schema))
    if missing or extra:
        raise MemoryStateError(f"memory state has missing fields {missing} and unknown fields {extra}; "
                               f"expected exactly {sorted(expected)}, plus all or none of "
                               f"{list(SCHEMA_FIELDS)}")
    out = {}
    for name, (shape, dtype) in expected.items():
        a = np.asarray(arrays[name])
        if a.shape != shape or a.dtype != dtype:
            raise MemoryStateError(f"memory state field {name!r} has shape {a.shape} dtype {a.dtype}, "
                                   f"expected shape {shape} dtype {dtype} (config {config})")
        out[name] = np.array(a, order="C", copy=True)
    for name in schema:         # shapes and values: SchemaReadout.from_state
        out[name] = np.array(arrays[name], order="C", copy=True)

    cap = config.capacity
    valid = out["valid"]
    live = np.flatnonzero(valid)
    next_seq = int(out["next_seq"])

    def bad(field: str, what: str, mask: np.ndarray) -> None:  # mask (n_live,)
        if mask.any():
            slot = int(live[np.flatnonzero(mask)[0]])
            raise MemoryStateError(f"memory state field {field!r}: slot {slot} {what}")

    lat = out["latents"][live].astype(np.float32)
    bad("latents", "is not finite", ~np.isfinite(lat).all(axis=1))
    bad("latents", "is all zeros (cosine undefined)", ~lat.any(axis=1))
    codes = out["codes"][live]
    bad("codes", "holds a negative unit id", (codes < 0).any(axis=1))
    if config.code_k > 1:
        bad("codes", "is not strictly ascending", (np.diff(codes, axis=1) <= 0).any(axis=1))
    bad("labels", "is negative or above 2**20 - 1", (out["labels"][live] < 0) | (out["labels"][live] >= 2**20))
    for field in ("surprise", "strength"):
        v = out[field][live]
        bad(field, "is negative or not finite", ~(np.isfinite(v) & (v >= 0)))
    for field in ("created_ts", "last_access_ts"):
        bad(field, "is not finite", ~np.isfinite(out[field][live]))
    bad("replay_count", "is negative", out["replay_count"][live] < 0)
    ids = out["episode_ids"][live]
    bad("episode_ids", f"does not map to its slot (id % {cap} != slot)",
        ids % np.uint64(cap) != live.astype(np.uint64))
    bad("episode_ids", f"is from the future (id // {cap} >= next_seq={next_seq})",
        ids // np.uint64(cap) >= np.uint64(next_seq))
    return out
