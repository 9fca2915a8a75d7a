"""numba kernels of the fast system: pure functions on arrays, no objects.

Shapes: B batch, d latent dim, m sparse units, k active units, n memory slots,
c candidates, K classes. Kernels trust their inputs (shape, dtype, finiteness,
contiguity): `SparseCoder`, `EpisodicMemory` and `AssociativeReadout` validate first.
All are ``nogil`` so a sleep thread can run them beside the ingest thread, and
``cache=True`` so ``python -m agent.warmup`` compiles them once into ``NUMBA_CACHE_DIR``.

Determinism: top-k ties go to the lower unit index; eviction ties to the older episode,
then the lower slot; sampling uses its own splitmix64 stream from ``seed`` (no global RNG).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# --------------------------------------------------------------------------- top-k


@njit(cache=True, nogil=True, inline="always")
def _worse(va, ia, vb, ib):
    # (va, ia) ranks below (vb, ib): smaller value, or equal value and larger index.
    return va < vb or (va == vb and ia > ib)


@njit(cache=True, nogil=True)
def _topk_row(z, k, hv, hi, out):
    # z (m,) f32 -> out (k,) int32 ascending ids of the k largest; hv (k,) f32, hi (k,) int32 scratch.
    # A size-k min-heap whose root is the worst unit kept: O(m log k), no (m,) sort.
    n = 0
    for j in range(z.shape[0]):
        v = z[j]
        if n < k:
            pos = n
            n += 1
            while pos > 0:
                parent = (pos - 1) >> 1
                if _worse(v, j, hv[parent], hi[parent]):
                    hv[pos] = hv[parent]
                    hi[pos] = hi[parent]
                    pos = parent
                else:
                    break
            hv[pos] = v
            hi[pos] = j
        elif v > hv[0]:  # j is above every kept index, so a tie with the root never wins
            pos = 0
            while True:
                child = 2 * pos + 1
                if child >= k:
                    break
                if child + 1 < k and _worse(hv[child + 1], hi[child + 1], hv[child], hi[child]):
                    child += 1
                if _worse(hv[child], hi[child], v, j):
                    hv[pos] = hv[child]
                    hi[pos] = hi[child]
                    pos = child
                else:
                    break
            hv[pos] = v
            hi[pos] = j
    out[:] = np.sort(hi)


@njit(cache=True, nogil=True)
def kwta(z, k):
    """k-winners-take-all. z (B, m) f32, 1 <= k <= m -> (B, k) int32 unit ids, ascending per row."""
    B, m = z.shape
    out = np.empty((B, k), dtype=np.int32)   # (B, k)
    hv = np.empty(k, dtype=z.dtype)          # (k,)
    hi = np.empty(k, dtype=np.int32)         # (k,)
    for b in range(B):
        _topk_row(z[b], k, hv, hi, out[b])
    return out


@njit(cache=True, nogil=True)
def project_kwta(x, P, bias, k, relu):
    """Fused ``kwta(x @ P + bias)`` (optionally ReLU first) without a (B, m) temporary.

    x (B, d) f32, P (d, m) f32, bias (m,) f32, k int, relu bool -> (B, k) int32 ascending.
    """
    B, d = x.shape
    m = P.shape[1]
    out = np.empty((B, k), dtype=np.int32)   # (B, k)
    z = np.empty(m, dtype=np.float32)        # (m,) one row of activations
    hv = np.empty(k, dtype=np.float32)
    hi = np.empty(k, dtype=np.int32)
    for b in range(B):
        z[:] = bias
        for i in range(d):
            xi = x[b, i]
            if xi != 0.0:                    # ReLU latents are often sparse
                for j in range(m):
                    z[j] += xi * P[i, j]
        if relu:
            for j in range(m):
                if z[j] < 0.0:
                    z[j] = 0.0
        _topk_row(z, k, hv, hi, out[b])
    return out


# --------------------------------------------------------------------------- overlap


@njit(cache=True, nogil=True)
def overlap_scores(query_code, codes, cand):
    """Shared active units between a query code and candidate episodes' codes.

    query_code (k,) int32 ascending, codes (n, k) int32 rows ascending, cand (c,) int64
    slots in [0, n) -> (c,) int32 counts. A merge of two sorted lists: O(c k).
    """
    k = query_code.shape[0]
    kc = codes.shape[1]
    out = np.zeros(cand.shape[0], dtype=np.int32)   # (c,)
    for t in range(cand.shape[0]):
        row = codes[cand[t]]
        i = 0
        j = 0
        count = 0
        while i < k and j < kc:
            a = query_code[i]
            b = row[j]
            if a == b:
                count += 1
                i += 1
                j += 1
            elif a < b:
                i += 1
            else:
                j += 1
        out[t] = count
    return out


# --------------------------------------------------------------------------- id lookup

# The id a free slot holds: never issued, and never found by `slots_of_ids` even when asked for.
FREE_ID = np.uint64(2**64 - 1)


@njit(cache=True, nogil=True)
def slots_of_ids(ids, episode_ids):
    """Slots of episode ids. ids (c,) uint64, episode_ids (n,) uint64 (free slots hold
    FREE_ID) -> ((c,) int64 slots with -1 where an id is not stored, int64 how many).

    Ids are ``seq * n + slot``, so the slot is ``id % n`` and the id is stored iff that slot
    holds it. One kernel call instead of four numpy calls: the query path's overhead.
    """
    n = np.uint64(episode_ids.shape[0])
    out = np.empty(ids.shape[0], dtype=np.int64)   # (c,)
    missing = 0
    for t in range(ids.shape[0]):
        s = ids[t] % n
        if episode_ids[s] == ids[t] and ids[t] != FREE_ID:
            out[t] = np.int64(s)
        else:
            out[t] = -1
            missing += 1
    return out, missing


# --------------------------------------------------------------------------- retention


@njit(cache=True, nogil=True, inline="always")
def _retention(strength, last_access_ts, replay_count, surprise, now,
               half_life_s, surprise_weight, replay_weight):
    # Scalar retention of one episode; the formula is documented in `retention_scores`.
    age = now - last_access_ts
    if age < 0.0:
        age = 0.0
    return (np.float64(strength) * np.exp2(-age / half_life_s)
            * (1.0 + surprise_weight * np.float64(surprise))
            / (1.0 + replay_weight * np.float64(replay_count)))


@njit(cache=True, nogil=True)
def retention_scores(strength, last_access_ts, replay_count, surprise, now,
                     half_life_s, surprise_weight, replay_weight):
    """How much each episode deserves to stay; eviction removes the lowest.

    strength (n,) f32, last_access_ts (n,) f64, replay_count (n,) int32, surprise (n,) f32,
    now f64 s, half_life_s > 0, surprise_weight >= 0, replay_weight >= 0 -> (n,) f64::

        strength * 2**(-max(now - last_access_ts, 0) / half_life_s)
                 * (1 + surprise_weight * surprise) / (1 + replay_weight * replay_count)

    Surprising episodes are worth more; episodes replayed many times have been consolidated
    into the slow system and are worth less to the fast one; unused ones fade.
    """
    n = strength.shape[0]
    out = np.empty(n, dtype=np.float64)   # (n,)
    for s in range(n):
        out[s] = _retention(strength[s], last_access_ts[s], replay_count[s], surprise[s], now,
                            half_life_s, surprise_weight, replay_weight)
    return out


@njit(cache=True, nogil=True)
def eviction_slot(labels, valid, class_counts, created_ts, strength, last_access_ts,
                  replay_count, surprise, now, half_life_s, surprise_weight, replay_weight):
    """The slot to evict: in the class holding the most episodes, the lowest retention.

    labels (n,) int32, valid (n,) bool, class_counts (L,) int64 live episodes per label,
    created_ts (n,) f64, then the `retention_scores` arrays and parameters -> int64 slot,
    -1 when nothing is stored. When several classes tie for the most episodes, the lowest
    retention among all of them goes. Ties in retention: older ``created_ts``, then lower slot.
    """
    max_count = 0
    for c in range(class_counts.shape[0]):
        if class_counts[c] > max_count:
            max_count = class_counts[c]
    best = -1
    if max_count == 0:
        return best
    best_score = np.inf
    best_created = np.inf
    for s in range(labels.shape[0]):
        if not valid[s] or class_counts[labels[s]] != max_count:
            continue
        score = _retention(strength[s], last_access_ts[s], replay_count[s], surprise[s], now,
                           half_life_s, surprise_weight, replay_weight)
        if score < best_score or (score == best_score and created_ts[s] < best_created):
            best = s
            best_score = score
            best_created = created_ts[s]
    return best


# --------------------------------------------------------------------------- sampling


@njit(cache=True, nogil=True, inline="always")
def _splitmix64(state):
    # -> (next state, 64 random bits). Small, fast, and ours: no global RNG state.
    state = state + np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True, inline="always")
def _uniform(state):
    # -> (next state, float in [0, 1)) from the top 53 bits.
    state, z = _splitmix64(state)
    return state, np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True, nogil=True, inline="always")
def _randint(state, n):
    # -> (next state, int in [0, n)).
    state, u = _uniform(state)
    r = np.int64(u * n)
    return state, (n - 1 if r >= n else r)


@njit(cache=True, nogil=True)
def class_balanced_sample(labels, valid, weights, n_samples, seed):
    """Draw episodes for replay, about equally many per class.

    labels (n,) int32 >= 0, valid (n,) bool, weights (n,) f32 >= 0, n_samples >= 0,
    seed >= 0 -> (n_samples,) int64 slots, or (0,) when nothing is stored.

    Every stored class gets ``n_samples // C`` draws, and ``n_samples % C`` classes chosen
    at random one more. Within a class draws are with replacement, proportional to
    `weights` (uniform when a class's weights are all zero). The result is shuffled so a
    replay batch mixes classes.
    """
    n = labels.shape[0]
    n_labels = 0
    for s in range(n):
        if valid[s] and labels[s] + 1 > n_labels:
            n_labels = labels[s] + 1
    if n_labels == 0 or n_samples == 0:
        return np.empty(0, dtype=np.int64)
    counts = np.zeros(n_labels, dtype=np.int64)            # (L,)
    for s in range(n):
        if valid[s]:
            counts[labels[s]] += 1
    starts = np.zeros(n_labels + 1, dtype=np.int64)        # (L+1,) offsets into `order`
    n_classes = 0
    max_count = 0
    for c in range(n_labels):
        starts[c + 1] = starts[c] + counts[c]
        if counts[c] > 0:
            n_classes += 1
            max_count = max(max_count, counts[c])
    order = np.empty(starts[n_labels], dtype=np.int64)     # slots grouped by label
    fill = starts[:n_labels].copy()
    classes = np.empty(n_classes, dtype=np.int64)
    ci = 0
    for c in range(n_labels):
        if counts[c] > 0:
            classes[ci] = c
            ci += 1
    for s in range(n):
        if valid[s]:
            order[fill[labels[s]]] = s
            fill[labels[s]] += 1

    state = np.uint64(seed)
    quota = np.full(n_classes, n_samples // n_classes, dtype=np.int64)
    perm = np.arange(n_classes)
    for i in range(n_samples % n_classes):                # partial Fisher-Yates
        state, r = _randint(state, n_classes - i)
        j = i + r
        perm[i], perm[j] = perm[j], perm[i]
        quota[perm[i]] += 1

    out = np.empty(n_samples, dtype=np.int64)              # (n_samples,)
    cum = np.empty(max_count, dtype=np.float64)            # cumulative weights of one class
    pos = 0
    for ci in range(n_classes):
        c = classes[ci]
        s0 = starts[c]
        cnt = counts[c]
        total = 0.0
        for t in range(cnt):
            total += np.float64(weights[order[s0 + t]])
            cum[t] = total
        for _ in range(quota[ci]):
            if total > 0.0:
                state, u = _uniform(state)
                target = u * total
                lo = 0
                hi = cnt - 1
                while lo < hi:                             # first t with cum[t] > target
                    mid = (lo + hi) >> 1
                    if cum[mid] > target:
                        hi = mid
                    else:
                        lo = mid + 1
                t = lo
            else:
                state, t = _randint(state, cnt)
            out[pos] = order[s0 + t]
            pos += 1
    for i in range(n_samples - 1, 0, -1):                  # Fisher-Yates shuffle
        state, j = _randint(state, i + 1)
        out[i], out[j] = out[j], out[i]
    return out


# --------------------------------------------------------------------------- associative readout


@njit(cache=True, nogil=True)
def assoc_update(W, code, label, lr):
    """FlyModel-style update, in place: only the k active units' weights to `label` move.

    W (m, K) f32, code (k,) int32, 0 <= label < K, 0 < lr <= 1. Each active row moves
    toward 1 for the true class, ``W[a, label] += lr * (1 - W[a, label])``, so weights
    stay in [0, 1] however often a class is seen; other rows and classes are untouched,
    which is what protects old classes (their units rarely overlap a new class's code).
    """
    for t in range(code.shape[0]):
        a = code[t]
        W[a, label] += lr * (1.0 - W[a, label])


@njit(cache=True, nogil=True)
def assoc_readout(W, code):
    """Class scores from active units. W (m, K) f32, code (k,) int32 -> (K,) f32 sum of active rows."""
    K = W.shape[1]
    out = np.zeros(K, dtype=np.float32)   # (K,)
    for t in range(code.shape[0]):
        row = W[code[t]]
        for c in range(K):
            out[c] += row[c]
    return out


# --------------------------------------------------------------------------- warmup


def warmup() -> None:
    """Compile every kernel for every dtype signature the runtime uses (see agent.warmup)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4)).astype(np.float32)          # (B, d)
    P = rng.standard_normal((4, 16)).astype(np.float32)         # (d, m)
    bias = np.zeros(16, dtype=np.float32)                       # (m,)
    kwta(x @ P, 3)
    project_kwta(x, P, bias, 3, False)
    codes = project_kwta(x, P, bias, 3, True)                   # (n, k)
    overlap_scores(codes[0], codes, np.arange(2, dtype=np.int64))
    slots_of_ids(np.arange(3, dtype=np.uint64), np.arange(2, dtype=np.uint64))
    labels = np.array([0, 1], dtype=np.int32)
    valid = np.ones(2, dtype=np.bool_)
    strength = np.ones(2, dtype=np.float32)
    ts = np.zeros(2, dtype=np.float64)
    replay = np.zeros(2, dtype=np.int32)
    surprise = np.ones(2, dtype=np.float32)
    retention_scores(strength, ts, replay, surprise, 1.0, 60.0, 1.0, 0.1)
    eviction_slot(labels, valid, np.ones(2, dtype=np.int64), ts, strength, ts, replay,
                  surprise, 1.0, 60.0, 1.0, 0.1)
    class_balanced_sample(labels, valid, surprise, 4, 0)
    W = np.zeros((16, 2), dtype=np.float32)                     # (m, K)
    assoc_update(W, codes[0], 1, 0.5)
    assoc_readout(W, codes[0])
    from agent.memory import schema_kernels  # its own module: kernels.py is at its size cap

    schema_kernels.warmup()
