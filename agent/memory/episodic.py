"""Episodic memory: the fast system's store of labelled latents, with a cosine kNN index.

Invariants (tested against a brute-force oracle in tests/agent/memory):

* at most ``capacity`` episodes; arrays are preallocated, nothing grows;
* episode ids are unique forever and increase with every add: ``id = seq * capacity + slot``
  where ``seq`` counts adds. A reused slot gets a new id, so an evicted or removed id is
  never returned again, and ``id % capacity`` finds the slot without a dictionary;
* when full, an add evicts from the class holding the most episodes, and within it the
  episode with the lowest retention (`kernels.retention_scores`); ties go to the older;
* hnswlib never runs a query concurrently with an insert or delete: one ``RLock`` guards
  every index call and every array mutation (hnswlib releases the GIL inside its calls);
* every added latent (and every one passed to `observe`) also enters the schema readout
  (`agent.memory.schema`: running class means and shared covariance), which eviction and
  removal do not touch: the schema keeps what evicted episodes taught.

The index stores hnswlib labels = episode ids. Evicted episodes are ``mark_deleted`` and
their graph nodes reused by ``add_items(..., replace_deleted=True)``
(``allow_replace_deleted=True``), so the index never holds more than ``capacity`` nodes.
Because labels are never reused, hnswlib's label bookkeeping on replacement stays exact.
"""

from __future__ import annotations

import operator
import threading
from os import PathLike

import hnswlib
import numpy as np

from agent.memory import kernels
from agent.memory._checks import (
    code_array,
    float_array,
    float_scalar,
    int_scalar,
    latent_vector,
)
from agent.memory.config import MemoryConfig
from agent.memory.errors import MemoryInputError, MemoryStateError
from agent.memory.schema import SchemaReadout
from agent.memory.state import (
    SCHEMA_FIELDS,
    STATE_FIELDS,
    Episodes,
    expected_fields,
    validate_state,
)

# Labels index per-class arrays (counts, readout columns): bound them so a bad label cannot
# allocate gigabytes. Far above any number of classes a device learns.
MAX_LABEL = 2**20 - 1

# The id a free slot holds, so `episode_ids_[slot] == id` alone says whether id is stored.
FREE_ID = int(kernels.FREE_ID)

_EMPTY_IDS = np.empty(0, dtype=np.uint64)
_EMPTY_DIST = np.empty(0, dtype=np.float32)


class EpisodicMemory:
    """Fixed-capacity store of episodes (latent, sparse code, label, surprise, times, strength).

    >>> mem = EpisodicMemory(MemoryConfig(capacity=100, dim=4, code_k=2))
    >>> eid = mem.add(np.ones(4, "f4"), code=[3, 7], label=0, surprise=0.5, ts=0.0)
    >>> ids, dist = mem.query(np.ones(4, "f4"), k=1)
    >>> bool(ids[0] == eid)
    True
    """

    def __init__(self, config: MemoryConfig):
        self.config = config
        self._lock = threading.RLock()
        for name, (shape, dtype) in expected_fields(config).items():
            setattr(self, name + "_", np.zeros(shape, dtype=dtype))
        self.labels_[:] = -1
        self.episode_ids_[:] = FREE_ID
        self._derive_bookkeeping()
        self._index = self._new_index()
        self.schema = self._new_schema()

    # ------------------------------------------------------------------ writes

    def add(self, latent, code, label: int, surprise: float = 0.0, ts: float = 0.0) -> int:
        """Store one episode and return its id; evicts one episode first when full.

        latent (dim,) finite, not all zero; code (code_k,) distinct unit ids; 0 <= label <= MAX_LABEL;
        surprise >= 0; ts in seconds (also the "now" that eviction scores retention at).
        """
        c = self.config
        x = self._latent(latent, store=True)
        code = code_array(code, name="code", k=c.code_k)
        label = int_scalar(label, name="label", lo=0, hi=MAX_LABEL)
        surprise = float_scalar(surprise, name="surprise", lo=0.0)
        ts = float_scalar(ts, name="ts")
        with self._lock:
            if not self._free:
                self._drop(self._eviction_slot(ts))
            slot = self._free.pop()
            eid = self._next_seq * c.capacity + slot
            if eid >= FREE_ID:
                self._free.append(slot)
                raise MemoryStateError(f"episode id {eid} overflows uint64; rebuild the memory")
            try:
                self._index.add_items(x.astype(np.float32)[None, :], np.array([eid], dtype=np.uint64),
                                      num_threads=1, replace_deleted=True)
            except Exception:
                self._free.append(slot)
                raise
            self._next_seq += 1
            self.latents_[slot] = x
            self.codes_[slot] = code
            self.labels_[slot] = label
            self.surprise_[slot] = surprise
            self.created_ts_[slot] = ts
            self.last_access_ts_[slot] = ts
            self.replay_count_[slot] = 0
            self.strength_[slot] = 1.0
            self.episode_ids_[slot] = eid
            self.valid_[slot] = True
            if label >= self._class_counts.shape[0]:
                grown = np.zeros(max(label + 1, 2 * self._class_counts.shape[0]), dtype=np.int64)
                grown[: self._class_counts.shape[0]] = self._class_counts
                self._class_counts = grown
            self._class_counts[label] += 1
            self._n += 1
            self.schema.observe(x, label)
        return eid

    def check_latent(self, latent, *, store: bool = True) -> None:
        """Raise MemoryInputError (naming the problem) if `add` (``store``) or `observe`
        would refuse this latent; changes nothing. Lets a caller validate before it logs."""
        self._latent(latent, store=store)

    def observe(self, latent, label: int) -> None:
        """Learn `latent`'s class statistics (the schema readout) without storing an episode:
        e.g. labelled latents the memory has no room or reason to keep."""
        x = latent_vector(latent, name="latent", dim=self.config.dim)
        label = int_scalar(label, name="label", lo=0, hi=MAX_LABEL)
        with self._lock:
            self.schema.observe(x, label)

    def remove(self, ids) -> int:
        """Forget these episodes; ids no longer stored are skipped. Returns how many went."""
        ids = self._ids(ids)
        with self._lock:
            slots = np.unique(self._slots_of(ids, strict=False))
            for slot in slots:
                self._drop(int(slot))
        return int(slots.shape[0])

    def decay(self, ids, factor: float) -> int:
        """Multiply the strength of these episodes by `factor` in [0, 1] (scheduled forgetting).

        Ids no longer stored are skipped (a sleep cycle may outlive some of its episodes).
        Returns how many episodes were decayed.
        """
        ids = self._ids(ids)
        factor = float_scalar(factor, name="factor", lo=0.0, hi=1.0)
        with self._lock:
            slots = np.unique(self._slots_of(ids, strict=False))
            self.strength_[slots] *= np.float32(factor)
        return int(slots.shape[0])

    def touch(self, ids, ts: float) -> int:
        """Record that these episodes were used at `ts` (retention counts idle time from it)."""
        ids = self._ids(ids)
        ts = float_scalar(ts, name="ts")
        with self._lock:
            slots = self._slots_of(ids, strict=False)
            self.last_access_ts_[slots] = ts
        return int(np.unique(slots).shape[0])

    def mark_replayed(self, ids, ts: float) -> int:
        """Count one replay per occurrence of an id (ids may repeat) and touch them at `ts`."""
        ids = self._ids(ids)
        ts = float_scalar(ts, name="ts")
        with self._lock:
            slots = self._slots_of(ids, strict=False)
            np.add.at(self.replay_count_, slots, 1)
            self.last_access_ts_[slots] = ts
        return int(slots.shape[0])

    # ------------------------------------------------------------------ reads

    def query(self, latent, k: int = 10, *, code=None) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest stored episodes by cosine distance: (ids (k',) uint64, distances (k',) f32).

        k' = min(k, len(self)); nearest first. With `code` (the query's sparse code), fetch
        ``k * rerank_factor`` candidates and keep the k sharing most active units, ties by
        distance.
        """
        q = self._latent(latent)
        k = int_scalar(k, name="k", lo=1)
        qcode = None if code is None else code_array(code, name="code", k=self.config.code_k)
        with self._lock:
            if self._n == 0:
                return _EMPTY_IDS, _EMPTY_DIST
            n_cand = min(self._n, k if qcode is None else k * self.config.rerank_factor)
            ids, dist = self._knn(q, n_cand)
            slots, missing = kernels.slots_of_ids(ids, self.episode_ids_)
            if missing:
                raise MemoryStateError("the hnswlib index returned ids the memory does not hold; "
                                       "index and arrays are out of sync")
            if qcode is not None:
                overlap = kernels.overlap_scores(qcode, self.codes_, slots)
                order = np.lexsort((dist, -overlap))[:k]
                ids, dist = ids[order], dist[order]
        return ids, dist

    def knn_vote(self, latent, k: int, n_classes: int, *, code=None) -> np.ndarray:
        """Class scores (n_classes,) f64 summing to 1: the k nearest episodes vote with weight
        max(cosine similarity, 0). All zeros when the memory is empty or nothing is similar."""
        n_classes = int_scalar(n_classes, name="n_classes", lo=1)
        with self._lock:
            ids, dist = self.query(latent, k, code=code)
            labels = self.labels_[kernels.slots_of_ids(ids, self.episode_ids_)[0]]
        if labels.size and labels.max() >= n_classes:
            raise MemoryInputError(f"n_classes={n_classes}, but a neighbour has label {int(labels.max())}")
        weights = np.clip(1.0 - dist.astype(np.float64), 0.0, None)
        scores = np.bincount(labels, weights=weights, minlength=n_classes)
        total = scores.sum()
        return scores / total if total > 0 else scores

    def neighbours(self, latents, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels and cosine distances of the k nearest episodes of each row of `latents`:
        (labels (B, k') int32, distances (B, k') f32), k' = min(k, len(self)), nearest first.

        The batched read path of prediction: one hnswlib call for the batch, no copies of
        the episodes themselves.
        """
        x = latents
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2
                and x.shape[1] == self.config.dim and np.isfinite(x.sum())):
            x = float_array(latents, name="latents", shape=(None, self.config.dim))   # (B, d)
        k = int_scalar(k, name="k", lo=1)
        with self._lock:
            n = min(k, self._n)
            if n == 0:
                return (np.zeros((x.shape[0], 0), np.int32), np.zeros((x.shape[0], 0), np.float32))
            try:
                ids, dist = self._index.knn_query(x, k=n, num_threads=1)        # (B, n)
            except RuntimeError:   # too few reachable live nodes: exact, row by row
                rows = [self._exact_knn(q, n) for q in x]
                ids = np.stack([r[0] for r in rows])
                dist = np.stack([r[1] for r in rows])
            slots, missing = kernels.slots_of_ids(ids.reshape(-1).astype(np.uint64),
                                                  self.episode_ids_)
            if missing:
                raise MemoryStateError("the hnswlib index returned ids the memory does not hold; "
                                       "index and arrays are out of sync")
            labels = self.labels_[slots].reshape(ids.shape)
        return labels, dist.astype(np.float32, copy=False)

    def schema_posterior(self, latents: np.ndarray, n_classes: int,
                         temperature: float = 1.0) -> np.ndarray:
        """The schema readout's class posteriors: latents (B, dim) -> (B, n_classes) f64,
        rows summing to 1 over the classes it has observed, all zeros before any."""
        x = float_array(latents, name="latents", shape=(None, self.config.dim))
        with self._lock:
            return self.schema.posterior(x, n_classes, temperature)

    def schema_posterior_and_distance(self, latents: np.ndarray, n_classes: int,
                                      temperature: float = 1.0
                                      ) -> tuple[np.ndarray, np.ndarray]:
        """`schema_posterior` and `schema_distance` in one pass (the predict path)."""
        x = float_array(latents, name="latents", shape=(None, self.config.dim))
        with self._lock:
            return self.schema.posterior_and_distance(x, n_classes, temperature)

    def schema_distance(self, latents: np.ndarray) -> np.ndarray:
        """`SchemaReadout.distance`: latents (B, dim) -> (B,) squared Mahalanobis distance
        to the nearest class mean, per dimension (+inf before any observation)."""
        x = float_array(latents, name="latents", shape=(None, self.config.dim))
        with self._lock:
            return self.schema.distance(x)

    def schema_counts(self, n_classes: int) -> np.ndarray:
        """Latents the schema readout has learned per class: (n_classes,) f64."""
        with self._lock:
            out = np.zeros(n_classes)
            k = min(n_classes, self.schema.counts_.shape[0])
            out[:k] = self.schema.counts_[:k]
            return out

    def get(self, ids) -> Episodes:
        """Copies of these episodes, in the order asked; an id not stored raises MemoryInputError."""
        ids = self._ids(ids)
        with self._lock:
            return self._episodes(self._slots_of(ids, strict=True))

    def sample_balanced(self, n_samples: int, seed: int, *, weighting: str = "surprise") -> Episodes:
        """About equally many episodes per class, with replacement, for replay.

        Within a class, draws are proportional to surprise (``weighting="surprise"``; uniform
        for a class whose surprise is all zero) or uniform (``"uniform"``). Deterministic in seed.
        """
        n_samples = int_scalar(n_samples, name="n_samples", lo=0, hi=2**40)
        seed = int_scalar(seed, name="seed", lo=0, hi=2**63 - 1)
        if weighting not in ("surprise", "uniform"):
            raise MemoryInputError(f"weighting={weighting!r}, expected 'surprise' or 'uniform'")
        with self._lock:
            weights = (self.surprise_ if weighting == "surprise"
                       else np.ones(self.config.capacity, dtype=np.float32))
            slots = kernels.class_balanced_sample(self.labels_, self.valid_, weights, n_samples, seed)
            return self._episodes(slots)

    def ids(self) -> np.ndarray:
        """Ids of all stored episodes, ascending (oldest first)."""
        with self._lock:
            return np.sort(self.episode_ids_[self.valid_])

    def class_counts(self) -> np.ndarray:
        """Stored episodes per label: (max stored label + 1,) int64."""
        with self._lock:
            nz = np.flatnonzero(self._class_counts)
            return self._class_counts[: (nz[-1] + 1 if nz.size else 0)].copy()

    def __len__(self) -> int:
        return self._n

    # ------------------------------------------------------------------ state

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Copies of every array, by name (`state.STATE_FIELDS`); with the index, a full checkpoint."""
        with self._lock:
            out = {name: getattr(self, name + "_").copy() for name in STATE_FIELDS if name != "next_seq"}
            out["next_seq"] = np.array(self._next_seq, dtype=np.uint64)
            out.update({f"schema_{k}": v for k, v in self.schema.state_arrays().items()})
            return out

    def save_index(self, path: str | PathLike) -> None:
        """Write the hnswlib index to `path` (hnswlib's own format)."""
        with self._lock:
            self._index.save_index(str(path))

    def checkpoint(self, index_path: str | PathLike) -> dict[str, np.ndarray]:
        """`save_index` and `state_arrays` under one lock, so the two always agree."""
        with self._lock:
            self.save_index(index_path)
            return self.state_arrays()

    @classmethod
    def from_state(cls, config: MemoryConfig, arrays: dict[str, np.ndarray],
                   index_path: str | PathLike | None = None) -> EpisodicMemory:
        """Rebuild from `state_arrays()` and, when given, an index file saved with them.

        The arrays are validated against `config` (MemoryStateError names the field). The
        caller verifies the index file's checksum; here it is loaded and checked to hold
        every stored episode's latent. Without `index_path` the index is rebuilt from the
        latents (slower: ~0.5 ms per episode; results equal up to HNSW's approximation).
        """
        arrays = validate_state(config, arrays)
        self = cls.__new__(cls)
        self.config = config
        self._lock = threading.RLock()
        for name in STATE_FIELDS:
            if name != "next_seq":
                setattr(self, name + "_", arrays[name])
        self.episode_ids_[~self.valid_] = FREE_ID
        self._derive_bookkeeping(next_seq=int(arrays["next_seq"]))
        live = np.flatnonzero(self.valid_)
        live = live[np.argsort(self.episode_ids_[live], kind="stable")]   # insertion order
        if SCHEMA_FIELDS[0] in arrays:
            self.schema = SchemaReadout.from_state(
                {k[len("schema_"):]: arrays[k] for k in SCHEMA_FIELDS},
                config.schema_shrinkage, config.schema_refresh_every)
            if self.schema.dim != config.dim:
                raise MemoryStateError(f"schema state has dim {self.schema.dim}, expected "
                                       f"{config.dim}")
        else:               # state from before the schema readout: what the episodes say
            self.schema = self._new_schema()
            for slot in live:
                self.schema.observe(self.latents_[slot], int(self.labels_[slot]))
        if index_path is None:
            self._index = self._new_index()
            if live.size:
                self._index.add_items(self.latents_[live].astype(np.float32), self.episode_ids_[live],
                                      num_threads=1)
            return self
        index = hnswlib.Index(space=config.space, dim=config.dim)
        try:
            index.load_index(str(index_path), max_elements=config.capacity, allow_replace_deleted=True)
            stored = index.get_items(self.episode_ids_[live]) if live.size else np.empty((0, config.dim))
        except RuntimeError as exc:
            raise MemoryStateError(f"{index_path}: hnswlib index does not match the arrays ({exc})") from None
        if index.element_count > config.capacity:
            raise MemoryStateError(f"{index_path}: index holds {index.element_count} nodes, "
                                   f"expected <= capacity {config.capacity}")
        want = self.latents_[live].astype(np.float32)
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        if not np.allclose(np.asarray(stored, dtype=np.float32), want, atol=1e-4):
            raise MemoryStateError(f"{index_path}: index vectors differ from the stored latents")
        index.set_ef(config.ef_search)
        index.set_num_threads(1)
        self._index = index
        return self

    # ------------------------------------------------------------------ internals

    def _new_index(self) -> hnswlib.Index:
        c = self.config
        index = hnswlib.Index(space=c.space, dim=c.dim)
        index.init_index(max_elements=c.capacity, M=c.M, ef_construction=c.ef_construction,
                         random_seed=c.seed, allow_replace_deleted=True)
        index.set_ef(c.ef_search)
        index.set_num_threads(1)
        return index

    def _new_schema(self) -> SchemaReadout:
        c = self.config
        return SchemaReadout(c.dim, c.schema_shrinkage, c.schema_refresh_every)

    def _derive_bookkeeping(self, next_seq: int = 0) -> None:
        self._next_seq = next_seq
        self._n = int(self.valid_.sum())
        self._free = np.flatnonzero(~self.valid_)[::-1].tolist()   # pop() yields the lowest slot
        labels = self.labels_[self.valid_]
        self._class_counts = np.bincount(labels, minlength=8).astype(np.int64)

    def _latent(self, latent, *, store: bool = False) -> np.ndarray:
        x = latent_vector(latent, name="latent", dim=self.config.dim)   # (d,) f32
        if store and self.config.latent_dtype != "float32":
            with np.errstate(over="ignore"):
                x = x.astype(self.config.latent_dtype)
            if not np.isfinite(x).all():
                raise MemoryInputError(f"latent holds a value beyond {self.config.latent_dtype}'s range "
                                       f"(max |x| = {float(np.abs(latent).max()):g}); it would be stored as inf")
        return x

    def _ids(self, ids) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.dtype.kind in "fO" and arr.ndim == 1 and not isinstance(ids, np.ndarray):
            try:   # a list with ints beyond int64 becomes float64 or object: convert exactly
                arr = np.array([operator.index(i) for i in ids], dtype=np.uint64)
            except (TypeError, OverflowError):
                pass   # reported below
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise MemoryInputError(f"ids have shape {arr.shape} dtype {arr.dtype}, expected (n,) integers")
        if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
            raise MemoryInputError(f"ids hold {int(arr.min())}, expected episode ids >= 0")
        return arr.astype(np.uint64)

    def _slots_of(self, ids: np.ndarray, *, strict: bool) -> np.ndarray:
        slots, missing = kernels.slots_of_ids(ids, self.episode_ids_)
        if missing and strict:
            gone = ids[slots < 0][:5].tolist()
            raise MemoryInputError(f"episode ids {gone} are not stored (evicted, removed or never added)")
        return slots[slots >= 0] if missing else slots

    def _episodes(self, slots: np.ndarray) -> Episodes:
        return Episodes(ids=self.episode_ids_[slots], latents=self.latents_[slots],
                        codes=self.codes_[slots], labels=self.labels_[slots],
                        surprise=self.surprise_[slots], created_ts=self.created_ts_[slots],
                        last_access_ts=self.last_access_ts_[slots],
                        replay_count=self.replay_count_[slots], strength=self.strength_[slots])

    def _eviction_slot(self, now: float) -> int:
        c = self.config
        slot = kernels.eviction_slot(self.labels_, self.valid_, self._class_counts, self.created_ts_,
                                     self.strength_, self.last_access_ts_, self.replay_count_,
                                     self.surprise_, float(now), float(c.half_life_s),
                                     float(c.surprise_weight), float(c.replay_weight))
        if slot < 0:
            raise MemoryStateError("memory is full but no episode is evictable")
        return int(slot)

    def _drop(self, slot: int) -> None:
        # Caller holds the lock. Index first: if hnswlib refuses, the arrays stay consistent.
        self._index.mark_deleted(int(self.episode_ids_[slot]))
        self.valid_[slot] = False
        self.episode_ids_[slot] = FREE_ID
        self._class_counts[self.labels_[slot]] -= 1
        self._n -= 1
        self._free.append(slot)

    def _knn(self, q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            ids, dist = self._index.knn_query(q[None, :], k=n, num_threads=1)
            return ids[0], dist[0]
        except RuntimeError:
            # hnswlib found fewer than n live nodes from its entry point (possible after
            # heavy deletion): answer exactly instead of failing the prediction.
            return self._exact_knn(q, n)

    def _exact_knn(self, q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        live = np.flatnonzero(self.valid_)
        X = self.latents_[live].astype(np.float32)                       # (n_live, d)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        dist = (1.0 - X @ (q / np.linalg.norm(q))).astype(np.float32)   # (n_live,)
        order = np.lexsort((live, dist))[:n]
        return self.episode_ids_[live[order]], dist[order]
