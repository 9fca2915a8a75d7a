"""Class subsets and the encoder/head split: files, manifest, verification, bad input."""

import json
import shutil

import numpy as np
import onnx
import pytest

from agent.bundle import load_bundle, write_manifest
from agent.dataset import load_dataset
from agent.errors import ConfigError, DatasetError
from export import train_bundle, verify_bundle
from export.classes import select_classes
from export.errors import VerifyError
from tests.export.conftest import BASE_DIGITS
from tests.export.test_cli import assert_one_line_error, run

DIGITS = tuple(str(i) for i in range(10))


def test_base_classes_train_on_the_subset_and_record_the_rest(digits5_bundle, digits_npz):
    m = load_bundle(digits5_bundle).manifest
    assert m["classes"] == list(DIGITS[:BASE_DIGITS])
    assert m["dataset_classes"] == list(DIGITS)
    assert m["held_out_classes"] == list(DIGITS[BASE_DIGITS:])
    assert m["arch"]["n_classes"] == BASE_DIGITS
    ds = load_dataset(digits_npz, seed=0)
    metrics = m["training"]["metrics"]
    assert metrics["n_test"] == int(np.sum(ds.y_test < BASE_DIGITS))  # base rows only
    assert metrics["n_train"] + metrics["n_val"] == int(np.sum(ds.y < BASE_DIGITS))
    assert metrics["test_accuracy"] > 0.9


def test_split_files_and_manifest(digits5_bundle):
    m = load_bundle(digits5_bundle).manifest
    assert set(m["files"]) == {"model.onnx", "encoder.onnx", "head.npz", "weights.npz",
                               "sae.npz", "exemplars.npz"}
    assert m["split"]["index"] == 1 and m["latent_dim"] == 256  # mlp default: early
    assert m["encoder"] == {"file": "encoder.onnx", "input_name": "input",
                            "output_name": "latent", "output_shape": [256]}
    assert m["head"]["dims"] == [256, 64, BASE_DIGITS] and m["head"]["activation"] == "relu"
    assert len(m["latent_stats"]["mean"]) == 256
    with np.load(digits5_bundle / "head.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["W0", "W1", "b0", "b1", "n_layers"]
        assert int(npz["n_layers"]) == 2
        assert npz["W0"].shape == (64, 256) and npz["W1"].shape == (BASE_DIGITS, 64)
        assert all(npz[k].dtype == np.float32 for k in ("W0", "W1", "b0", "b1"))
    with np.load(digits5_bundle / "exemplars.npz", allow_pickle=False) as npz:
        assert npz["latents"].shape == (m["exemplars"]["n"], 256)
        assert sorted(set(npz["labels"].tolist())) == list(range(BASE_DIGITS))
        np.testing.assert_allclose(npz["latent_mean"], m["latent_stats"]["mean"], atol=1e-5)
    proto = onnx.load(str(digits5_bundle / "encoder.onnx"))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["latent"]


def test_verify_checks_all_three_parities_on_random_and_real_inputs(digits5_bundle, digits_npz):
    report = verify_bundle(digits5_bundle, data=digits_npz)
    for inputs in ("random", "data"):
        assert set(report.diffs[inputs]) == {"model_vs_torch", "encoder_vs_torch",
                                             "encoder_head_vs_model"}
        assert max(report.diffs[inputs].values()) <= 1e-4
    # Accuracy counts only rows of the bundle's classes; the held-out digits are skipped.
    assert report.data_accuracy > 0.9 and 0 < report.data_rows_scored < 1024


def _rehash(copy):
    write_manifest(copy, json.loads((copy / "manifest.json").read_text()))


def test_a_head_that_disagrees_with_the_model_fails_naming_it(digits5_bundle, tmp_path):
    copy = shutil.copytree(digits5_bundle, tmp_path / "copy")
    with np.load(copy / "head.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["b1"] = arrays["b1"] + np.float32(0.01)
    with open(copy / "head.npz", "wb") as f:
        np.savez(f, **arrays)
    _rehash(copy)
    with pytest.raises(VerifyError, match=r"encoder\.onnx \+ numpy head - model\.onnx.*head\.npz"):
        verify_bundle(copy)


def test_an_encoder_from_another_bundle_fails_parity(digits5_bundle, digits_bundle, tmp_path):
    copy = shutil.copytree(digits5_bundle, tmp_path / "copy")
    shutil.copy(digits_bundle / "encoder.onnx", copy / "encoder.onnx")
    _rehash(copy)
    with pytest.raises(VerifyError, match=r"encoder\.onnx - torch encoder"):
        verify_bundle(copy)


def test_classes_in_a_given_order_and_late_split_via_the_cli(capsys, synthetic_npz, tmp_path):
    out = tmp_path / "b"
    rc, stdout, err = run(capsys, "train", "--data", str(synthetic_npz), "--out", str(out),
                          "--classes", "walk, idle,shake", "--split", "late", "--epochs", "2",
                          "--arch", "cnn1d", "--quiet")  # (C, T) default is minirocket since issue 12
    assert rc == 0, err
    m = load_bundle(out).manifest
    assert m["classes"] == ["walk", "idle", "shake"]
    assert m["held_out_classes"] == ["run"]
    assert m["split"]["index"] == 2 and m["latent_dim"] == 64
    assert m["head"]["dims"] == [64, 3]
    assert "held out ['run']" in stdout


@pytest.mark.parametrize("argv, match", [
    (["--classes", "walk,swim,fly"], "unknown class(es) ['swim', 'fly']"),
    (["--classes", "walk,walk"], "given more than once"),
    (["--classes", "walk"], "has 1 class; training needs >= 2 classes"),
    (["--classes", "walk,,run"], "expected comma-separated class names"),
    (["--base-classes", "9"], "base_classes=9"),
    (["--split", "middle"], "split='middle'"),
    (["--split", "7"], "split=7"),
    (["--sae-units", "64"], "--sae-units/--sae-active need --sae"),
])
def test_bad_subsets_and_splits_give_one_line_errors(capsys, synthetic_npz, tmp_path, argv,
                                                      match):
    rc, _, err = run(capsys, "train", "--data", str(synthetic_npz), "--out",
                     str(tmp_path / "b"), "--epochs", "1", "--quiet", *argv)
    assert_one_line_error(rc, err, match)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_classes_and_base_classes_are_exclusive(capsys, synthetic_npz, tmp_path):
    with pytest.raises(SystemExit):
        run(capsys, "train", "--data", str(synthetic_npz), "--out", str(tmp_path / "b"),
            "--classes", "walk,run", "--base-classes", "2")
    ds = load_dataset(synthetic_npz)
    with pytest.raises(ConfigError, match="not both"):
        select_classes(ds, ["walk", "run"], 2)


def test_too_few_samples_after_subsetting(tmp_path):
    from agent.dataset import save_dataset

    X = np.random.default_rng(0).standard_normal((22, 4)).astype(np.float32)
    y = np.array(["a"] * 10 + ["b"] * 10 + ["c"] * 2)
    data = save_dataset(tmp_path / "d.npz", X, y)
    with pytest.raises(DatasetError, match="too few training samples per class"):
        train_bundle(data, tmp_path / "b", classes=["a", "c"], epochs=1, verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]
