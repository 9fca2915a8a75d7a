"""Schema readout: the numba observation kernel and the posterior against obvious numpy
oracles, and the memory's ownership (observe, eviction, state)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError
from agent.memory import EpisodicMemory, MemoryConfig, MemoryStateError
from agent.memory.schema import SchemaReadout
from agent.memory.schema_kernels import schema_observe

SETTINGS = settings(max_examples=40, deadline=None)


# ------------------------------------------------------------------ oracles


def oracle_stats(X, y, K):
    """Per-class counts and means, pooled within-class scatter: the textbook sums."""
    d = X.shape[1]
    counts, means, scatter = np.zeros(K), np.zeros((K, d)), np.zeros((d, d))
    for c in range(K):
        Xc = X[y == c]
        if len(Xc):
            counts[c], means[c] = len(Xc), Xc.mean(axis=0)
            scatter += (Xc - means[c]).T @ (Xc - means[c])
    return counts, means, scatter


def oracle_posterior(X, y, Q, n_classes, shrinkage, temperature=1.0):
    """Gaussian class posteriors with one shared covariance, equal priors, solved directly."""
    K = int(y.max()) + 1
    counts, means, A = oracle_stats(X, y, K)
    seen = np.flatnonzero(counts[:n_classes])
    lam = shrinkage * np.trace(A) / A.shape[0] if np.trace(A) > 0 else 1.0
    cov = (A + lam * np.eye(A.shape[0])) / max(counts.sum() - np.count_nonzero(counts), 1)
    z = np.stack([Q @ np.linalg.solve(cov, means[c]) - 0.5 * means[c] @ np.linalg.solve(cov, means[c])
                  for c in seen], axis=1) / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    out = np.zeros((len(Q), n_classes))
    out[:, seen] = p / p.sum(axis=1, keepdims=True)
    return out


def _data(seed, n, d, K):
    rng = np.random.default_rng(seed)
    centres = 3 * rng.standard_normal((K, d))
    y = rng.integers(0, K, n)
    return centres[y] + rng.standard_normal((n, d)), y, rng


# ------------------------------------------------------------------ kernel


@SETTINGS
@given(seed=st.integers(0, 2**31), n=st.integers(1, 60), d=st.integers(1, 9), K=st.integers(1, 5),
       warm=st.integers(0, 20))
def test_kernel_matches_the_textbook_statistics_and_inverse(seed, n, d, K, warm):
    X, y, rng = _data(seed, n + warm, d, K)
    lam = float(rng.uniform(0.1, 2.0))
    # Start from `warm` observations summarised exactly, then stream the rest.
    counts, means, scatter = oracle_stats(X[:warm], y[:warm], K)
    precision = np.linalg.inv(scatter + lam * np.eye(d))
    for x, c in zip(X[warm:], y[warm:], strict=True):
        schema_observe(means, counts, scatter, precision, x, int(c), True)
    want = oracle_stats(X, y, K)
    np.testing.assert_array_equal(counts, want[0])
    np.testing.assert_allclose(means, want[1], atol=1e-9)
    np.testing.assert_allclose(scatter, want[2], rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(precision, np.linalg.inv(want[2] + lam * np.eye(d)),
                               rtol=1e-6, atol=1e-9)


def test_kernel_without_precision_tracking_leaves_it_alone():
    means, counts, scatter, precision = np.zeros((2, 3)), np.zeros(2), np.zeros((3, 3)), np.eye(3)
    for x in (np.ones(3), np.arange(3.0), np.full(3, 2.0)):
        schema_observe(means, counts, scatter, precision, x, 1, False)
    np.testing.assert_array_equal(precision, np.eye(3))
    assert counts.tolist() == [0, 3] and scatter.any()


# ------------------------------------------------------------------ readout


@SETTINGS
@given(seed=st.integers(0, 2**31), n=st.integers(2, 80), d=st.integers(1, 8), K=st.integers(1, 5),
       refresh=st.sampled_from([1, 7, 256]), shrinkage=st.sampled_from([1e-3, 1e-2, 0.5]))
def test_streaming_posterior_matches_the_direct_solution(seed, n, d, K, refresh, shrinkage):
    X, y, rng = _data(seed, n, d, K)
    s = SchemaReadout(d, shrinkage, refresh)
    Q = rng.standard_normal((5, d))
    for i, (x, c) in enumerate(zip(X, y, strict=True)):
        s.observe(x, int(c))
        if i % 9 == 0:                      # reads between observations: lazy refreshes
            s.posterior(Q, K + 1)
    # The shrinkage is the one of the last exact recompute: compare after a fresh one.
    s.refresh()
    got = s.posterior(Q, K + 1)
    np.testing.assert_allclose(got, oracle_posterior(X, y, Q, K + 1, shrinkage), atol=1e-6)
    assert got[:, K].sum() == 0                       # never observed: probability 0
    np.testing.assert_allclose(s.scatter_, oracle_stats(X, y, K)[2], rtol=1e-9, atol=1e-8)


def test_rank_one_updates_stay_close_to_an_exact_inverse_between_refreshes():
    X, y, _ = _data(3, 2000, 32, 6)
    s = SchemaReadout(32, 1e-2, refresh_every=10**6)
    for x, c in zip(X[:100], y[:100], strict=True):
        s.observe(x, int(c))
    s.posterior(X[:1], 6)                             # exact here
    lam = 1e-2 * np.trace(s.scatter_) / 32
    for x, c in zip(X[100:], y[100:], strict=True):
        s.observe(x, int(c))
    exact = np.linalg.inv(s.scatter_ + lam * np.eye(32))
    assert np.abs(s.precision_ - exact).max() <= 1e-8 * np.abs(exact).max()


def test_posterior_edge_cases_and_bad_config():
    s = SchemaReadout(2)
    assert not s.posterior(np.zeros((3, 2)), 4).any()                     # nothing observed
    s.observe(np.array([1.0, 0.0]), 2)
    np.testing.assert_array_equal(s.posterior(np.zeros((1, 2)), 4), [[0, 0, 1, 0]])
    assert not s.posterior(np.zeros((1, 2)), 2).any()                     # class 2 not asked
    for kw, name in (({"dim": 0}, "dim"), ({"dim": 2, "shrinkage": 0}, "shrinkage"),
                     ({"dim": 2, "refresh_every": 0}, "refresh_every")):
        with pytest.raises(ConfigError, match=name):
            SchemaReadout(**kw)


# ------------------------------------------------------------------ in the memory


def _memory(capacity=20, d=6):
    return EpisodicMemory(MemoryConfig(capacity=capacity, dim=d, code_k=2,
                                       latent_dtype="float32"))


def test_memory_schema_outlives_eviction_and_observe_stores_nothing():
    X, y, _ = _data(5, 60, 6, 3)
    mem = _memory()
    for i, (x, c) in enumerate(zip(X[:40], y[:40], strict=True)):
        mem.add(x.astype(np.float32), [0, 1], int(c), ts=float(i))
    for x, c in zip(X[40:], y[40:], strict=True):
        mem.observe(x.astype(np.float32), int(c))
    assert len(mem) == 20                                  # 20 evicted, 20 only observed
    want = oracle_posterior(X.astype(np.float32).astype(np.float64), y, X[:7], 3, 1e-2)
    mem.schema.refresh()
    np.testing.assert_allclose(mem.schema_posterior(X[:7].astype(np.float32), 3), want, atol=1e-6)


def test_memory_state_round_trip_keeps_the_schema_and_old_state_rebuilds_it():
    X, y, _ = _data(6, 30, 6, 3)
    mem = _memory(capacity=40)
    for x, c in zip(X[:20], y[:20], strict=True):
        mem.add(x.astype(np.float32), [0, 1], int(c))
    for x, c in zip(X[20:], y[20:], strict=True):
        mem.observe(x.astype(np.float32), int(c))
    Q = X[:5].astype(np.float32)
    arrays = mem.state_arrays()
    again = EpisodicMemory.from_state(mem.config, arrays)
    np.testing.assert_allclose(again.schema_posterior(Q, 3), mem.schema_posterior(Q, 3), atol=1e-9)
    # State written before the schema existed: rebuilt from the stored episodes only.
    old = {k: v for k, v in arrays.items() if not k.startswith("schema_")}
    rebuilt = EpisodicMemory.from_state(mem.config, old)
    assert rebuilt.schema.n_observed() == 20
    np.testing.assert_allclose(rebuilt.schema.scatter_,
                               oracle_stats(X[:20].astype(np.float32).astype(np.float64),
                                            y[:20], 3)[2], atol=1e-6)
    with pytest.raises(MemoryStateError, match=r"missing fields \['schema_scatter'\]"):
        EpisodicMemory.from_state(mem.config, {**old, "schema_counts": arrays["schema_counts"],
                                               "schema_means": arrays["schema_means"]})
    with pytest.raises(MemoryStateError, match="schema state has counts"):
        EpisodicMemory.from_state(mem.config, {**arrays, "schema_means": arrays["schema_means"][:, :2]})


def test_distance_matches_the_obvious_mahalanobis():
    rng = np.random.default_rng(5)
    s = SchemaReadout(dim=4)
    X = rng.standard_normal((60, 4))
    y = rng.integers(0, 3, 60)
    for x, c in zip(X, y, strict=True):
        s.observe(x + 3 * c, int(c))
    Q = rng.standard_normal((7, 4)) * 4
    s.refresh()
    seen = np.flatnonzero(s.counts_ > 0)
    dof = s.counts_.sum() - len(seen)
    want = np.array([min(dof * (q - s.means_[c]) @ s.precision_ @ (q - s.means_[c])
                         for c in seen) for q in Q]) / 4
    np.testing.assert_allclose(s.distance(Q), want, rtol=1e-9, atol=1e-9)
    assert np.isinf(SchemaReadout(dim=4).distance(Q)).all()


def test_leave_one_out_distances_match_refitting_without_the_latent():
    """The exact leave-one-out (Sherman-Morrison) against the obvious: drop the latent from
    its class, recompute means and scatter, invert with the same ridge, measure."""
    rng = np.random.default_rng(6)
    d = 3
    s = SchemaReadout(dim=d)
    X = rng.standard_normal((12, d))
    y = np.array([0] * 5 + [1] * 6 + [2])
    Xs = X + 2 * y[:, None]
    for x, c in zip(Xs, y, strict=True):
        s.observe(x, int(c))
    s.refresh()
    lam = s.shrinkage * np.trace(s.scatter_) / d
    seen, d2 = s.class_distances(Xs, leave_out=y)
    for i in range(11):
        keep = np.arange(12) != i
        means = {c: Xs[keep & (y == c)].mean(axis=0) for c in (0, 1, 2)}
        A = sum((Xs[keep & (y == c)] - means[c]).T @ (Xs[keep & (y == c)] - means[c])
                for c in (0, 1, 2))
        P = np.linalg.inv(A + lam * np.eye(d))
        dof = 12 - 3 - 1
        want = [dof * (Xs[i] - means[c]) @ P @ (Xs[i] - means[c]) / d for c in (0, 1, 2)]
        np.testing.assert_allclose(d2[i], want, rtol=1e-8)
    assert np.isinf(d2[11, 2])              # a class of one has no mean without it
    _, plain = s.class_distances(Xs)
    own = np.arange(11), y[:11]
    assert (d2[own] > plain[own]).all()     # to its own class, a seen latent looks closer


def test_posterior_and_distance_in_one_pass_equal_the_separate_calls():
    rng = np.random.default_rng(8)
    s = SchemaReadout(dim=5)
    for x, c in zip(rng.standard_normal((40, 5)), rng.integers(0, 4, 40), strict=True):
        s.observe(x + c, int(c))
    Q = rng.standard_normal((6, 5)) * 3
    p, dist = s.posterior_and_distance(Q, 3, temperature=2.0)   # class 3 outside n_classes
    np.testing.assert_allclose(p, s.posterior(Q, 3, temperature=2.0))
    _, d2 = s.class_distances(Q)
    np.testing.assert_allclose(dist, d2.min(axis=1), rtol=1e-9, atol=1e-12)
