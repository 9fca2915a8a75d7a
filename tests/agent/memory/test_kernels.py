"""Every numba kernel against a slow, obvious numpy oracle on random inputs."""

import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.memory import kernels

SETTINGS = settings(max_examples=40, deadline=None)


# ------------------------------------------------------------------ oracles


def oracle_kwta(z, k):
    """Sort by (-value, index), keep k, return ids ascending."""
    out = []
    for row in z:
        order = np.lexsort((np.arange(row.size), -row.astype(np.float64)))
        out.append(np.sort(order[:k]))
    return np.array(out, dtype=np.int32).reshape(len(z), k)


def oracle_retention(strength, last_access_ts, replay_count, surprise, now, half_life_s, sw, rw):
    age = np.maximum(now - last_access_ts, 0.0)
    return (strength.astype(np.float64) * 2.0 ** (-age / half_life_s)
            * (1 + sw * surprise.astype(np.float64)) / (1 + rw * replay_count.astype(np.float64)))


def assert_valid_topk(z64, idx, k, tol):
    """idx holds k distinct units none of which is beaten by an unchosen one (beyond tol)."""
    for row, chosen in zip(z64, idx, strict=True):
        assert len(set(chosen.tolist())) == k and (np.diff(chosen) > 0).all()
        rest = np.setdiff1d(np.arange(row.size), chosen)
        if rest.size:
            assert row[chosen].min() >= row[rest].max() - tol


# ------------------------------------------------------------------ kwta / projection


@SETTINGS
@given(B=st.integers(1, 5), m=st.integers(1, 300), data=st.data(), seed=st.integers(0, 2**32 - 1),
       ties=st.booleans())
def test_kwta_matches_oracle(B, m, data, seed, ties):
    k = data.draw(st.integers(1, m))
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((B, m)).astype(np.float32)
    if ties:  # few distinct values: exercises the lower-index-wins tie rule
        z = np.round(z).astype(np.float32)
    got = kernels.kwta(z, k)
    assert got.dtype == np.int32 and got.shape == (B, k)
    np.testing.assert_array_equal(got, oracle_kwta(z, k))


@SETTINGS
@given(B=st.integers(1, 4), d=st.integers(1, 40), m=st.integers(1, 200), data=st.data(),
       seed=st.integers(0, 2**32 - 1), relu=st.booleans(), sparse_x=st.booleans())
def test_project_kwta_is_topk_of_projection(B, d, m, data, seed, relu, sparse_x):
    k = data.draw(st.integers(1, m))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, d)).astype(np.float32)
    if sparse_x:
        x[rng.random((B, d)) < 0.5] = 0.0
    P = rng.standard_normal((d, m)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    z = x.astype(np.float64) @ P.astype(np.float64) + bias
    if relu:
        z = np.maximum(z, 0.0)
    got = kernels.project_kwta(x, P, bias, k, relu)
    assert got.shape == (B, k) and got.dtype == np.int32
    assert_valid_topk(z, got, k, tol=1e-4 * (1 + np.abs(z).max()))
    if relu:  # exact zeros tie exactly: the lower index must win among them
        for row, chosen in zip(z, got, strict=True):
            zeros_in = chosen[row[chosen] == 0]
            zeros_out = np.setdiff1d(np.flatnonzero(row == 0), chosen)
            if zeros_in.size and zeros_out.size:
                assert zeros_in.max() < zeros_out.min()


def test_project_kwta_equals_kwta_of_product_on_separated_values():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    P = rng.standard_normal((64, 2048)).astype(np.float32)
    bias = np.zeros(2048, dtype=np.float32)
    got = kernels.project_kwta(x, P, bias, 41, False)
    want = kernels.kwta((x.astype(np.float64) @ P).astype(np.float32), 41)
    # Different summation order may flip a unit at the boundary; nearly all must agree.
    agree = np.mean([len(np.intersect1d(a, b)) / 41 for a, b in zip(got, want, strict=True)])
    assert agree > 0.99


# ------------------------------------------------------------------ overlap


@SETTINGS
@given(n=st.integers(1, 50), k=st.integers(1, 20), m=st.integers(20, 100), c=st.integers(0, 60),
       seed=st.integers(0, 2**32 - 1))
def test_overlap_scores_match_intersect1d(n, k, m, c, seed):
    rng = np.random.default_rng(seed)
    codes = np.sort(np.array([rng.choice(m, k, replace=False) for _ in range(n)], dtype=np.int32), axis=1)
    q = np.sort(rng.choice(m, k, replace=False)).astype(np.int32)
    cand = rng.integers(0, n, c).astype(np.int64)
    got = kernels.overlap_scores(q, codes, cand)
    want = [len(np.intersect1d(q, codes[s])) for s in cand]
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.array(want, dtype=np.int32))


@SETTINGS
@given(n=st.integers(1, 40), seq=st.integers(0, 2**20), seed=st.integers(0, 2**32 - 1))
def test_slots_of_ids_matches_lookup(n, seq, seed):
    rng = np.random.default_rng(seed)
    free = np.uint64(2**64 - 1)
    episode_ids = np.array([(seq + int(rng.integers(0, 5))) * n + s for s in range(n)], dtype=np.uint64)
    episode_ids[rng.random(n) < 0.3] = free
    asked = np.concatenate([rng.choice(episode_ids, 10),
                            rng.integers(0, (seq + 6) * n, 10).astype(np.uint64)])
    slots, missing = kernels.slots_of_ids(asked, episode_ids)
    want = np.array([np.flatnonzero(episode_ids == i)[0] if i != free and i in episode_ids else -1
                     for i in asked])
    np.testing.assert_array_equal(slots, want)
    assert missing == (want < 0).sum()


# ------------------------------------------------------------------ retention / eviction


def _episode_arrays(rng, n, n_labels):
    return dict(
        labels=rng.integers(0, n_labels, n).astype(np.int32),
        valid=rng.random(n) < 0.8,
        created_ts=rng.uniform(0, 100, n),
        strength=rng.uniform(0, 1, n).astype(np.float32),
        last_access_ts=rng.uniform(0, 200, n),
        replay_count=rng.integers(0, 10, n).astype(np.int32),
        surprise=rng.uniform(0, 3, n).astype(np.float32),
    )


@SETTINGS
@given(n=st.integers(0, 200), seed=st.integers(0, 2**32 - 1),
       now=st.floats(0, 400), half_life_s=st.floats(0.5, 1e6),
       sw=st.floats(0, 5), rw=st.floats(0, 5))
def test_retention_scores_match_formula(n, seed, now, half_life_s, sw, rw):
    a = _episode_arrays(np.random.default_rng(seed), n, 3)
    args = (a["strength"], a["last_access_ts"], a["replay_count"], a["surprise"])
    got = kernels.retention_scores(*args, now, half_life_s, sw, rw)
    np.testing.assert_allclose(got, oracle_retention(*args, now, half_life_s, sw, rw), rtol=1e-12)


def oracle_eviction(a, now, hl, sw, rw):
    labels, valid = a["labels"], a["valid"]
    if not valid.any():
        return -1
    counts = np.bincount(labels[valid], minlength=labels.max() + 1)
    cand = np.flatnonzero(valid & (counts[labels] == counts.max()))
    score = oracle_retention(a["strength"], a["last_access_ts"], a["replay_count"], a["surprise"],
                             now, hl, sw, rw)[cand]
    return int(cand[np.lexsort((cand, a["created_ts"][cand], score))[0]])


@SETTINGS
@given(n=st.integers(1, 150), n_labels=st.integers(1, 6), seed=st.integers(0, 2**32 - 1),
       ties=st.booleans())
def test_eviction_slot_matches_oracle(n, n_labels, seed, ties):
    rng = np.random.default_rng(seed)
    a = _episode_arrays(rng, n, n_labels)
    if ties:  # equal scores everywhere: the oldest episode of the biggest class goes
        a["strength"][:] = 1
        a["last_access_ts"][:] = 50.0
        a["replay_count"][:] = 0
        a["surprise"][:] = 0
        a["created_ts"] = np.round(a["created_ts"] / 20)  # ties in age too: lowest slot wins
    counts = np.bincount(a["labels"][a["valid"]], minlength=n_labels).astype(np.int64)
    got = kernels.eviction_slot(a["labels"], a["valid"], counts, a["created_ts"], a["strength"],
                                a["last_access_ts"], a["replay_count"], a["surprise"],
                                120.0, 60.0, 1.0, 0.25)
    assert got == oracle_eviction(a, 120.0, 60.0, 1.0, 0.25)


# ------------------------------------------------------------------ class-balanced sampling


@SETTINGS
@given(n=st.integers(0, 120), n_labels=st.integers(1, 7), n_samples=st.integers(0, 300),
       seed=st.integers(0, 2**63 - 1), zero_frac=st.floats(0, 1))
def test_class_balanced_sample_quotas_and_support(n, n_labels, n_samples, seed, zero_frac):
    rng = np.random.default_rng(seed % 2**32)
    labels = rng.integers(0, n_labels, n).astype(np.int32)
    valid = rng.random(n) < 0.7
    weights = rng.uniform(0, 1, n).astype(np.float32)
    weights[rng.random(n) < zero_frac] = 0
    got = kernels.class_balanced_sample(labels, valid, weights, n_samples, seed)
    np.testing.assert_array_equal(got, kernels.class_balanced_sample(labels, valid, weights, n_samples, seed))
    present = np.unique(labels[valid])
    if present.size == 0:
        assert got.shape == (0,)
        return
    assert got.shape == (n_samples,) and got.dtype == np.int64
    assert valid[got].all()
    per_class = np.array([(labels[got] == c).sum() for c in present])
    assert per_class.sum() == n_samples and per_class.max() - per_class.min() <= 1
    for c in present:  # a zero-weight episode is drawn only when its whole class weighs zero
        members = valid & (labels == c)
        if weights[members].sum() > 0:
            assert (weights[got[labels[got] == c]] > 0).all()


def test_class_balanced_sample_follows_weights_within_class():
    labels = np.array([0, 0, 0, 1, 1, 2], dtype=np.int32)
    valid = np.ones(6, dtype=np.bool_)
    weights = np.array([1, 2, 5, 0, 3, 0], dtype=np.float32)
    got = kernels.class_balanced_sample(labels, valid, weights, 60_000, 7)
    freq = np.bincount(got, minlength=6) / 20_000
    np.testing.assert_allclose(freq, [1 / 8, 2 / 8, 5 / 8, 0, 1, 1], atol=0.02)
    assert not np.array_equal(got, kernels.class_balanced_sample(labels, valid, weights, 60_000, 8))
    # Shuffled: classes are mixed along the output, not in blocks.
    assert len(np.unique(labels[got[:30]])) == 3


# ------------------------------------------------------------------ associative readout


@SETTINGS
@given(m=st.integers(2, 60), K=st.integers(1, 6), steps=st.integers(1, 20),
       seed=st.integers(0, 2**32 - 1), lr=st.floats(0.01, 1.0))
def test_assoc_update_and_readout_match_loops(m, K, steps, seed, lr):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, m + 1))
    W = np.zeros((m, K), dtype=np.float32)
    W_oracle = np.zeros((m, K), dtype=np.float64)
    for _ in range(steps):
        code = np.sort(rng.choice(m, k, replace=False)).astype(np.int32)
        label = int(rng.integers(0, K))
        before = W.copy()
        kernels.assoc_update(W, code, label, lr)
        for a in code:
            W_oracle[a, label] += lr * (1 - W_oracle[a, label])
        changed = np.argwhere(W != before)
        assert all(r in code and c == label for r, c in changed)   # only active rows, true class
    np.testing.assert_allclose(W, W_oracle, rtol=1e-5, atol=1e-6)
    assert (W >= 0).all() and (W <= 1).all()
    code = np.sort(rng.choice(m, k, replace=False)).astype(np.int32)
    np.testing.assert_allclose(kernels.assoc_readout(W, code), W[code].sum(axis=0), rtol=1e-5)


WARMUP_COVERAGE = """
import numpy as np
from agent.memory import (AssociativeReadout, EpisodicMemory, MemoryConfig, ReadoutConfig,
                          SparseCoder, kernels)
names = [n for n in dir(kernels) if hasattr(getattr(kernels, n), "signatures") and n[0] != "_"]
kernels.warmup()
before = {n: len(getattr(kernels, n).signatures) for n in names}
rng = np.random.default_rng(0)
coder = SparseCoder(16, center=np.ones(16))
sae = SparseCoder.from_sae(rng.standard_normal((64, 16)), rng.standard_normal(64), 5)
for dtype in ("float16", "float32"):
    mem = EpisodicMemory(MemoryConfig(capacity=8, dim=16, code_k=coder.k, latent_dtype=dtype))
    ro = AssociativeReadout(ReadoutConfig(code_k=coder.k))
    for i in range(12):   # callers' dtypes vary on purpose: float64 latents, numpy ints
        x = rng.standard_normal(16)
        c = coder.encode_one(x)
        sae.encode(x[None].astype(np.float16))
        mem.add(x, c.tolist(), np.int16(i % 3), surprise=np.float32(0.5), ts=i)
        mem.query(x.astype(np.float32), 5, code=c)
        ro.learn(c, np.int64(i % 3))
        ro.scores(c)
    mem.sample_balanced(10, 1)
    mem.sample_balanced(10, np.int64(2), weighting="uniform")
after = {n: len(getattr(kernels, n).signatures) for n in names}
assert len(names) == 9 and before == after, (before, after)
"""


def test_warmup_covers_every_signature_the_runtime_uses():
    """After warmup(), ordinary use compiles nothing new, whatever dtypes callers pass."""
    subprocess.run([sys.executable, "-c", WARMUP_COVERAGE], check=True, timeout=300)
