"""Fusion: the numba fast path against the numpy oracles, and hand-checked cases."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.learner import fusion, kernels


@settings(max_examples=200, deadline=None)
@given(B=st.integers(1, 6), k=st.integers(0, 12), kh=st.integers(1, 5), extra=st.integers(0, 4),
       temperature=st.sampled_from([0.01, 0.02, 0.1, 1.0]), seed=st.integers(0, 2**31))
def test_kernel_matches_numpy_oracle(B, k, kh, extra, temperature, seed):
    rng = np.random.default_rng(seed)
    n = kh + extra
    labels = rng.integers(0, n, (B, k)).astype(np.int32)
    dist = np.sort(rng.uniform(0, 2, (B, k)).astype(np.float32), axis=1)
    p_head = rng.dirichlet(np.ones(kh), B)
    probs, decided, p_fast = kernels.fuse_max_similarity(labels, dist, p_head, n, temperature)
    fast = fusion.max_similarity_batch(labels, dist, n, temperature)
    np.testing.assert_allclose(p_fast, fast, rtol=1e-9, atol=1e-12)
    want, who = fusion.fuse_batch(p_head, fast)
    np.testing.assert_allclose(probs, want, rtol=1e-9, atol=1e-12)
    assert [("slow", "agree", "fast")[d] for d in decided] == who
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_batch_oracles_match_single_row_versions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (4, 8)).astype(np.int32)
    dist = rng.uniform(0, 1, (4, 8)).astype(np.float32)
    p_head = rng.dirichlet(np.ones(3), 4)
    fast = fusion.max_similarity_batch(labels, dist, 5, 0.05)
    for b in range(4):
        np.testing.assert_allclose(fast[b], fusion.max_similarity_scores(labels[b], dist[b], 5, 0.05))
        out, who = fusion.fuse(p_head[b], fast[b])
        np.testing.assert_allclose(fusion.fuse_batch(p_head, fast)[0][b], out)


def test_hand_checked_cases():
    # empty memory: the head decides alone
    out, who = fusion.fuse(np.array([0.7, 0.3]), np.zeros(3))
    assert who == "slow" and np.allclose(out, [0.7, 0.3, 0.0])
    # a new class whose episode is nearest takes the mass the fast system gives it
    fast = fusion.max_similarity_scores(np.array([2, 0]), np.array([0.05, 0.5]), 3, 0.1)
    out, who = fusion.fuse(np.array([0.9, 0.1]), fast)
    assert who == "fast" and out.argmax() == 2
    # head classes share the fast system's head mass in the head's proportions
    out, _ = fusion.fuse(np.array([0.75, 0.25]), np.array([0.5, 0.3, 0.2]))
    assert np.allclose(out, [0.6, 0.2, 0.2])
    # a class with one close episode is not outvoted by many farther ones
    labels = np.array([0, 0, 0, 0, 1])
    dist = np.array([0.30, 0.31, 0.32, 0.33, 0.10])
    assert fusion.max_similarity_scores(labels, dist, 2, 0.05).argmax() == 1
    assert fusion.knn_scores(labels, dist, 2, 1.0).argmax() == 0


def test_mix_schema_hand_checked():
    probs = np.array([[0.6, 0.4, 0.0], [0.2, 0.8, 0.0], [0.5, 0.5, 0.0]])
    schema = np.array([[0.0, 0.0, 1.0], [0.1, 0.9, 0.0], [0.0, 0.0, 0.0]])   # row 2: nothing known
    out, who = fusion.mix_schema(probs, ["slow", "agree", "slow"], schema, 0.5)
    np.testing.assert_allclose(out, [[0.3, 0.2, 0.5], [0.15, 0.85, 0.0], [0.5, 0.5, 0.0]])
    assert who == ["fast", "agree", "slow"]            # only row 0's winner changed
    same, who0 = fusion.mix_schema(probs, ["slow"] * 3, schema, 0.0)
    assert same is probs and who0 == ["slow"] * 3
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
