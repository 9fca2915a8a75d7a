"""SparseCoder: oracle top-k of the projection, determinism, locality, validation, state."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError, InputError
from agent.memory import MemoryInputError, MemoryStateError, SparseCoder, SparseCoderConfig


def topk_oracle_ok(z, codes, k):
    for row, chosen in zip(z, codes, strict=True):
        assert chosen.shape == (k,) and (np.diff(chosen) > 0).all()
        rest = np.setdiff1d(np.arange(row.size), chosen)
        if rest.size:
            assert row[chosen].min() >= row[rest].max() - 1e-4 * (1 + np.abs(row).max())


def test_default_config_gives_two_percent():
    cfg = SparseCoderConfig()
    assert (cfg.n_units, cfg.k) == (2048, 41)
    coder = SparseCoder(64, cfg)
    assert coder.projection_.shape == (64, 2048) and coder.projection_.dtype == np.float32


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 48), m=st.integers(8, 512), frac=st.floats(0.005, 0.3),
       seed=st.integers(0, 1000), B=st.integers(1, 6))
def test_encode_is_topk_of_random_projection(d, m, frac, seed, B):
    coder = SparseCoder(d, SparseCoderConfig(n_units=m, active_fraction=frac, seed=seed))
    x = np.random.default_rng(seed).standard_normal((B, d)).astype(np.float32)
    codes = coder.encode(x)
    assert codes.dtype == np.int32 and codes.shape == (B, coder.k)
    topk_oracle_ok(x.astype(np.float64) @ coder.projection_, codes, coder.k)
    np.testing.assert_array_equal(coder.encode_one(x[0]), codes[0])


def test_seeded_and_scale_invariant():
    x = np.random.default_rng(0).standard_normal((20, 64)).astype(np.float32)
    a = SparseCoder(64, SparseCoderConfig(seed=3)).encode(x)
    np.testing.assert_array_equal(a, SparseCoder(64, SparseCoderConfig(seed=3)).encode(x))
    assert not np.array_equal(a, SparseCoder(64, SparseCoderConfig(seed=4)).encode(x))
    # Powers of two scale exactly in floating point: the code depends on direction only.
    coder = SparseCoder(64, SparseCoderConfig(seed=3))
    np.testing.assert_array_equal(coder.encode(4 * x), a)
    np.testing.assert_array_equal(coder.encode(x / 8), a)


def test_codes_overlap_more_for_nearby_latents():
    rng = np.random.default_rng(1)
    coder = SparseCoder(64, SparseCoderConfig(seed=0))
    x = np.abs(rng.standard_normal((200, 64))).astype(np.float32)   # non-negative, like ReLU latents
    near = x + 0.1 * np.abs(rng.standard_normal(x.shape)).astype(np.float32)
    far = np.abs(rng.standard_normal(x.shape)).astype(np.float32)
    cx, cn, cf = coder.encode(x), coder.encode(near), coder.encode(far)
    ov_near = np.mean([len(np.intersect1d(a, b)) for a, b in zip(cx, cn, strict=True)])
    ov_far = np.mean([len(np.intersect1d(a, b)) for a, b in zip(cx, cf, strict=True)])
    assert ov_near > 25 > ov_far   # of 41 active units
    # Non-negative latents share a dominant mean direction, so few units ever win...
    assert np.unique(cf).size < 1000
    # ...until they are centred: codes then spread over most of the expansion.
    centred = SparseCoder(64, SparseCoderConfig(seed=0), center=x.mean(axis=0))
    assert np.unique(centred.encode(far)).size > 1500
    ov_centred = np.mean([len(np.intersect1d(a, b)) for a, b in
                          zip(centred.encode(x), centred.encode(far), strict=True)])
    assert ov_centred < ov_far / 2


@settings(max_examples=20, deadline=None)
@given(d=st.integers(1, 20), m=st.integers(2, 200), seed=st.integers(0, 1000), data=st.data())
def test_from_sae_is_topk_of_relu(d, m, seed, data):
    k = data.draw(st.integers(1, m))
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, d)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32) - 1.0   # many units below zero: relu ties at 0
    coder = SparseCoder.from_sae(W, b, k)
    x = rng.standard_normal((5, d)).astype(np.float32)
    z = np.maximum(x.astype(np.float64) @ W.T.astype(np.float64) + b, 0)
    codes = coder.encode(x)
    topk_oracle_ok(z, codes, k)
    for row, chosen in zip(z, codes, strict=True):      # among exact zeros the lower ids win
        zeros_in, zeros_out = chosen[row[chosen] == 0], np.setdiff1d(np.flatnonzero(row == 0), chosen)
        if zeros_in.size and zeros_out.size:
            assert zeros_in.max() < zeros_out.min()


@pytest.mark.parametrize("bad, match", [
    (np.zeros((3, 63), np.float32), r"latents has shape \(3, 63\), expected \(n, 64\)"),
    (np.zeros(64, np.float32), r"latents has shape \(64,\), expected \(n, 64\)"),
    (np.full((2, 64), np.nan, np.float32), "non-finite"),
    (np.full((2, 64), np.inf, np.float32), "non-finite"),
    (np.full((1, 64), 1e300), "non-finite"),                       # overflows float32
    (np.array([["a"] * 64]), "dtype"),
])
def test_encode_rejects_bad_input(bad, match):
    coder = SparseCoder(64)
    with pytest.raises(MemoryInputError, match=match) as exc:
        coder.encode(bad)
    assert isinstance(exc.value, InputError) and isinstance(exc.value, ValueError)


def test_encode_one_names_expected_shape():
    with pytest.raises(MemoryInputError, match=r"expected \(64,\)"):
        SparseCoder(64).encode_one(np.zeros((1, 64), np.float32))


@pytest.mark.parametrize("kwargs", [dict(n_units=0), dict(active_fraction=0.0),
                                    dict(active_fraction=1.5), dict(seed=-1)])
def test_config_validated(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        SparseCoderConfig(**kwargs)


def test_from_sae_validates():
    with pytest.raises(MemoryInputError, match=r"b_enc has shape \(3,\), expected \(4,\)"):
        SparseCoder.from_sae(np.zeros((4, 2)), np.zeros(3), 2)
    with pytest.raises(ConfigError, match="k=5"):
        SparseCoder.from_sae(np.zeros((4, 2)), np.zeros(4), 5)


def test_state_round_trip():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((10, 32)).astype(np.float32)
    for coder in (SparseCoder(32, SparseCoderConfig(n_units=256, seed=5)),
                  SparseCoder.from_sae(rng.standard_normal((128, 32)), rng.standard_normal(128), 7)):
        again = SparseCoder.from_state(coder.state_arrays())
        assert (again.k, again.kind, again.relu) == (coder.k, coder.kind, coder.relu)
        np.testing.assert_array_equal(again.encode(x), coder.encode(x))
    state = SparseCoder(32).state_arrays()
    state["bias"] = np.zeros(5, np.float32)
    with pytest.raises(MemoryStateError, match=r"bias has shape \(5,\)"):
        SparseCoder.from_state(state)
