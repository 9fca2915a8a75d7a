"""The bundle's class statistics (``exemplars.npz`` ``class_counts``, ``class_means``,
``class_scatter``): computed like the textbook sums, checked by `export verify` (present
when the manifest lists them, agreeing with the exemplars), optional for older bundles."""

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.bundle import write_manifest
from agent.learner.state import CLASS_STATS
from export import verify_bundle
from export.errors import VerifyError
from export.pipeline import class_statistics, exemplar_arrays


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 60), d=st.integers(1, 6),
       K=st.integers(1, 5))
def test_class_statistics_are_the_textbook_sums(seed, n, d, K):
    rng = np.random.default_rng(seed)
    Z = (rng.standard_normal((n, d)) * rng.uniform(0.1, 10, d)).astype(np.float32)
    y = rng.integers(0, K, n)
    got = class_statistics(Z, y, K + 1)                  # class K never occurs
    Z64 = Z.astype(np.float64)
    assert got["class_counts"].dtype == np.int64
    assert got["class_means"].dtype == got["class_scatter"].dtype == np.float32
    assert got["class_counts"].tolist() == [int((y == c).sum()) for c in range(K + 1)]
    want_scatter = np.zeros((d, d))
    for c in range(K + 1):
        if (y == c).any():
            mu = Z64[y == c].mean(axis=0)
            np.testing.assert_allclose(got["class_means"][c], mu, rtol=1e-6, atol=1e-6)
            want_scatter += np.einsum("ni,nj->ij", Z64[y == c] - mu, Z64[y == c] - mu)
        else:
            assert not got["class_means"][c].any()
    np.testing.assert_allclose(got["class_scatter"], want_scatter, rtol=1e-6,   # float32
                               atol=1e-6 * max(1.0, np.abs(want_scatter).max()))
    np.testing.assert_array_equal(got["class_scatter"], got["class_scatter"].T)


def test_exemplars_carry_the_statistics_of_every_training_latent_zero_ones_too():
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((40, 3)).astype(np.float32)
    Z[:5] = 0                                          # skipped as exemplars, not as data
    y = np.arange(40) % 2
    arrays = exemplar_arrays(Z, y, per_class=4, seed=0, n_classes=3)
    assert arrays["labels"].shape == (8,) and arrays["class_counts"].tolist() == [20, 20, 0]
    pooled = arrays["class_counts"] @ arrays["class_means"] / 40
    np.testing.assert_allclose(pooled, arrays["latent_mean"], atol=1e-6)


def test_a_new_bundle_ships_and_verifies_its_class_statistics(synthetic_bundle):
    manifest = json.loads((synthetic_bundle / "manifest.json").read_text())
    assert manifest["exemplars"]["class_statistics"] == list(CLASS_STATS)
    with np.load(synthetic_bundle / "exemplars.npz") as z:
        counts = z["class_counts"]
        assert z["class_means"].shape == (len(counts), manifest["latent_dim"])
    assert counts.sum() == manifest["exemplars"]["n_statistics"] and (counts >= 1).all()
    line = verify_bundle(synthetic_bundle).checks[-1]
    assert line.endswith(f"class statistics of {counts.sum()} training latents")


def _copy(src, dst, change_arrays, change_manifest=lambda m: m):
    shutil.copytree(src, dst)
    with np.load(dst / "exemplars.npz") as z:
        arrays = change_arrays({k: z[k] for k in z.files})
    with open(dst / "exemplars.npz", "wb") as f:
        np.savez(f, **arrays)
    write_manifest(dst, change_manifest(json.loads((dst / "manifest.json").read_text())))
    return dst


def _without_stats(arrays):
    return {k: v for k, v in arrays.items() if k not in CLASS_STATS}


def _old_manifest(m):
    ex = {k: v for k, v in m["exemplars"].items()
          if k not in ("class_statistics", "n_statistics")}
    return {**m, "exemplars": ex}


def test_a_bundle_from_before_the_statistics_still_verifies(synthetic_bundle, tmp_path):
    old = _copy(synthetic_bundle, tmp_path / "old", _without_stats, _old_manifest)
    assert verify_bundle(old).checks[-1].endswith("(no class statistics: a bundle from "
                                                  "before them)")


def _other_means(a):
    return {**a, "class_means": a["class_means"] + 0.5}


def _fewer_than_exemplars(a):
    return {**a, "class_counts": np.minimum(a["class_counts"], 3)}


def _zero_count(a):
    return {**a, "class_counts": np.r_[0, a["class_counts"][1:]]}


def _nan_scatter(a):
    s = a["class_scatter"].copy()
    s[0, 0] = np.nan
    return {**a, "class_scatter": s}


@pytest.mark.parametrize("change_arrays, change_manifest, match", [
    (_without_stats, lambda m: m, r"lacks \['class_counts', 'class_means', 'class_scatter'\]"),
    (lambda a: {k: v for k, v in a.items() if k != "class_means"}, _old_manifest,
     r"lacks \['class_means'\]"),
    (_other_means, lambda m: m, r"the count-weighted class_means differ from latent_mean"),
    (_fewer_than_exemplars, lambda m: m, r"class_counts\[0\] = 3, but the class has \d+ exemplars"),
    (_zero_count, lambda m: m, r"class_counts\[0\] = 0"),
    (_nan_scatter, lambda m: m, r"class_scatter holds non-finite"),
    (lambda a: {**a, "class_counts": a["class_counts"][:-1]}, lambda m: m,
     r"class_counts int64\[3\].*expected ints \[4\]"),
    (lambda a: a, lambda m: {**m, "exemplars": {**m["exemplars"], "n_statistics": 7}},
     r"class_counts sum to \d+, the manifest says n_statistics = 7"),
])
def test_verify_refuses_missing_or_disagreeing_statistics(synthetic_bundle, tmp_path,
                                                          change_arrays, change_manifest, match):
    bad = _copy(synthetic_bundle, tmp_path / "bad", change_arrays, change_manifest)
    with pytest.raises(VerifyError, match=f"exemplars.npz: {match}"):
        verify_bundle(bad)
