"""`SchemaReadout.seed_stats`: statistics summarised elsewhere (a bundle's base training
latents) against the oracle of observing the same latents one by one, and bad arrays."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.memory import MemoryInputError
from agent.memory.schema import SchemaReadout, check_stats
from tests.agent.memory.test_schema import _data, oracle_posterior, oracle_stats

SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(seed=st.integers(0, 2**31), n=st.integers(2, 80), d=st.integers(1, 8),
       K=st.integers(1, 5), split=st.floats(0, 1), refresh=st.sampled_from([1, 7, 256]))
def test_seeded_statistics_give_the_posterior_of_observing_every_latent(seed, n, d, K, split,
                                                                       refresh):
    X, y, rng = _data(seed, n, d, K)
    m = int(split * n)                  # the first m summarised, the rest streamed after
    Q = rng.standard_normal((6, d))
    one_by_one = SchemaReadout(d, 1e-2, refresh)
    for x, c in zip(X, y, strict=True):
        one_by_one.observe(x, int(c))
    seeded = SchemaReadout(d, 1e-2, refresh)
    seeded.seed_stats(*oracle_stats(X[:m], y[:m], K))
    for x, c in zip(X[m:], y[m:], strict=True):
        seeded.observe(x, int(c))
    for s in (one_by_one, seeded):
        s.refresh()                     # the same shrinkage: the one of the final scatter
    got = seeded.posterior(Q, K + 1)
    np.testing.assert_allclose(got, one_by_one.posterior(Q, K + 1), atol=1e-6)
    np.testing.assert_allclose(got, oracle_posterior(X, y, Q, K + 1, 1e-2), atol=1e-6)
    assert seeded.n_observed() == n
    want = one_by_one.state_arrays()
    for key, value in seeded.state_arrays().items():
        np.testing.assert_allclose(value, want[key], rtol=1e-9, atol=1e-8)


def test_seeding_replaces_what_was_observed_and_survives_a_state_round_trip():
    X, y, rng = _data(4, 50, 5, 3)
    stats = oracle_stats(X, y, 3)
    fresh, used = SchemaReadout(5), SchemaReadout(5)
    for x in rng.standard_normal((30, 5)):
        used.observe(100 + x, 7)                  # dropped: the seed covers what it needs
    fresh.seed_stats(*stats)
    used.seed_stats(*stats)
    Q = rng.standard_normal((4, 5))
    np.testing.assert_array_equal(used.posterior(Q, 8), fresh.posterior(Q, 8))
    assert used.n_observed() == 50 and not used.posterior(Q, 8)[:, 3:].any()
    again = SchemaReadout.from_state(used.state_arrays())
    np.testing.assert_allclose(again.posterior(Q, 8), used.posterior(Q, 8), atol=1e-12)


def test_a_class_with_count_zero_is_unseen_whatever_its_mean_row():
    s = SchemaReadout(2)
    s.seed_stats(np.array([2, 0, 2]), np.array([[0.0, 0.0], [np.pi, 1], [4.0, 4.0]]),
                 0.1 * np.eye(2))
    p = s.posterior(np.array([[3.0, 2.5]]), 3)
    assert p[0, 1] == 0 and p[0, 2] > p[0, 0]
    s.observe(np.array([3.0, 1.0]), 1)          # its first latent sets the mean, as ever
    assert s.posterior(np.array([[3.0, 1.0]]), 3).argmax() == 1


GOOD = (np.array([3, 2]), np.zeros((2, 3)), np.eye(3))


@pytest.mark.parametrize("i, value, match", [
    (0, np.array([3, -1]), r"counts holds a negative value"),
    (0, np.array([3.0, np.nan]), r"counts holds non-finite"),
    (0, np.array([[3, 2]]), r"counts has shape \(1, 2\)"),
    (0, np.array([True, True]), r"counts is bool"),
    (1, np.zeros((3, 3)), r"means has shape \(3, 3\)"),
    (1, np.full((2, 3), np.inf), r"means holds non-finite"),
    (2, np.eye(4), r"scatter has shape \(4, 4\).*d = 3"),
    (2, np.diag([1.0, -1.0, 1.0]), r"scatter has a negative diagonal entry"),
    (2, np.triu(np.ones((3, 3))), r"scatter is not symmetric"),
    (2, "eye", r"scatter is str"),
])
def test_bad_statistics_are_rejected_naming_the_array(i, value, match):
    arrays = list(GOOD)
    arrays[i] = value
    assert check_stats(*arrays, dim=3)
    s = SchemaReadout(3)
    s.observe(np.ones(3), 0)
    with pytest.raises(MemoryInputError, match=f"schema statistics: {match}"):
        s.seed_stats(*arrays)
    assert s.n_observed() == 1                    # rejected before anything changed
    assert check_stats(*GOOD, dim=3) is None
