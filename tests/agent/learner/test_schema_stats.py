"""The learner's schema readout starts from the bundle's statistics of every base training
latent (``exemplars.npz`` ``class_counts``, ``class_means``, ``class_scatter``); bundles
without them seed it from the exemplars as before; bad statistics are refused."""

import json
import shutil

import numpy as np
import pytest

from agent.bundle import write_manifest
from agent.errors import BundleError
from agent.learner import Learner, LearnerConfig
from agent.learner.state import CLASS_STATS
from tests.agent.learner.conftest import BASE, NEW, windows

CONFIG = LearnerConfig(capacity=500)
# Stored episodes are float16 by default, and the schema learns a stored one as stored:
# the oracle comparison stores float32 so that both sides see the same latents.
EXACT = LearnerConfig(capacity=500, latent_dtype="float32")


def _copy_with(src, dst, change) -> None:
    """Copy the bundle at `src` to `dst` with ``exemplars.npz``'s arrays passed through
    `change` (dict -> dict), the manifest re-hashed: a well-formed bundle of other content."""
    shutil.copytree(src, dst)
    with np.load(dst / "exemplars.npz") as z:
        arrays = change({k: z[k] for k in z.files})
    with open(dst / "exemplars.npz", "wb") as f:
        np.savez(f, **arrays)
    manifest = json.loads((dst / "manifest.json").read_text())
    write_manifest(dst, manifest)


@pytest.fixture(scope="module")
def old_bundle(base_bundle, tmp_path_factory):
    """base_bundle as exported before the class statistics: exemplars only."""
    dst = tmp_path_factory.mktemp("old") / "bundle"

    def strip(arrays):
        return {k: v for k, v in arrays.items() if k not in CLASS_STATS}

    _copy_with(base_bundle, dst, strip)
    manifest = json.loads((dst / "manifest.json").read_text())
    for key in ("class_statistics", "n_statistics"):
        manifest["exemplars"].pop(key)
    write_manifest(dst, manifest)
    return dst


def test_seeding_from_statistics_equals_observing_every_training_latent(old_bundle, tmp_path):
    # The oracle needs statistics of exactly the exemplars (the exporter draws exemplars
    # from the training rows but summarises the validation rows too): then the old
    # bundle's learner observes exactly the latents the statistics summarise, one by one.
    from export.pipeline import class_statistics

    def of_exemplars(arrays):
        stats = class_statistics(arrays["latents"], arrays["labels"], len(BASE))
        return {**arrays, **{f"class_{k}": v for k, v in
                             (("counts", stats["class_counts"]), ("means", stats["class_means"]),
                              ("scatter", stats["class_scatter"]))}}

    exact_bundle = tmp_path / "exact"
    _copy_with(old_bundle, exact_bundle, of_exemplars)
    manifest = json.loads((exact_bundle / "manifest.json").read_text())
    manifest["exemplars"].update(class_statistics=list(CLASS_STATS), n_statistics=None)
    write_manifest(exact_bundle, manifest)
    probe = np.concatenate([windows(c, 6, seed=21) for c in BASE + NEW])
    with Learner.from_bundle(exact_bundle, EXACT) as new, \
            Learner.from_bundle(old_bundle, EXACT) as old:
        assert "class_scatter" in new._exemplars and "class_scatter" not in old._exemplars
        want, got = old.memory.schema.state_arrays(), new.memory.schema.state_arrays()
        np.testing.assert_array_equal(got["counts"], want["counts"])
        np.testing.assert_allclose(got["means"], want["means"], atol=1e-5)
        np.testing.assert_allclose(got["scatter"], want["scatter"], rtol=1e-6,
                                   atol=1e-6 * np.abs(want["scatter"]).max())
        lat = new.encode(probe) - new.center
        np.testing.assert_allclose(new.memory.schema_posterior(lat, len(BASE)),
                                   old.memory.schema_posterior(lat, len(BASE)), atol=1e-6)
        for p, q in zip(new.predict_many(probe), old.predict_many(probe), strict=True):
            assert p.label == q.label
            np.testing.assert_allclose(p.probs, q.probs, atol=1e-6)
        assert len(new.memory) == len(old.memory) == 20 * len(BASE)
        assert new.novelty_threshold == old.novelty_threshold


def test_the_statistics_replace_the_exemplars_no_double_count(base_bundle, tmp_path):
    # Statistics of 3x the exemplars, with the exemplars' own class means: had the stored
    # exemplars been counted on top, the counts would show it.
    def triple(arrays):
        return {**arrays, "class_counts": 3 * arrays["class_counts"]}

    _copy_with(base_bundle, tmp_path / "b", triple)
    with np.load(base_bundle / "exemplars.npz") as z:
        counts = z["class_counts"]
    with Learner.from_bundle(tmp_path / "b", CONFIG) as L:
        assert L.memory.schema_counts(len(BASE)).tolist() == (3 * counts).tolist()
        assert len(L.memory) == 20 * len(BASE)            # the episodes are still stored
        L.learn_one(windows("shake", 1, seed=2)[0], "shake")
        assert L.memory.schema.n_observed() == 3 * counts.sum() + 1


def test_a_bundle_without_statistics_still_learns_and_predicts(old_bundle):
    with Learner.from_bundle(old_bundle, CONFIG) as L:
        n = L._exemplars["labels"].shape[0]
        assert L.memory.schema.n_observed() == n            # every exemplar, as before
        for w in windows("shake", 5, seed=1):
            L.learn_one(w, "shake")
        preds = L.predict_many(windows("shake", 10, seed=12))
        assert np.mean([p.label == "shake" for p in preds]) >= 0.8


def _set(key, value):
    return lambda a: {**a, key: value(a)}


@pytest.mark.parametrize("change, match", [
    (_set("class_means", lambda a: np.where(np.eye(*a["class_means"].shape) > 0, np.nan,
                                            a["class_means"])),
     r"class_means holds non-finite"),
    (_set("class_counts", lambda a: np.r_[0, a["class_counts"][1:]]),
     r"class_counts must be >= 1 for every class"),
    (_set("class_counts", lambda a: a["class_counts"][:-1]),
     r"class_counts is int64\[3\], expected ints \[4\]"),
    (_set("class_counts", lambda a: a["class_counts"].astype(np.float64)),
     r"class_counts is float64\[4\], expected ints"),
    (_set("class_scatter", lambda a: a["class_scatter"][:-1, :-1]),
     r"class_scatter has shape \((\d+), \1\); expected"),
    (_set("class_scatter", lambda a: a["class_scatter"] + np.triu(np.ones(a["class_scatter"].shape))),
     r"class_scatter is not symmetric"),
    (_set("class_means", lambda a: a["class_means"].astype(np.int64)),
     r"class_means is int64, expected floats"),
    (lambda a: {k: v for k, v in a.items() if k != "class_scatter"},
     r"not \['class_scatter'\].*all or none"),
])
def test_bad_statistics_are_refused_naming_file_and_array(base_bundle, tmp_path, change, match):
    _copy_with(base_bundle, tmp_path / "b", change)
    with pytest.raises(BundleError, match=f"exemplars.npz: .*{match}"):
        Learner.from_bundle(tmp_path / "b", CONFIG)
