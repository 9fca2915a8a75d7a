import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from agent.bundle import load_bundle, write_manifest
from agent.dataset import load_dataset
from agent.errors import BundleError, ConfigError
from export import train_bundle, verify_bundle
from export.errors import VerifyError
from export.train import TrainConfig, train
from tests.export.conftest import SYN_CLASSES


def _copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "copy")


def test_digits_bundle_loads_and_verifies(digits_bundle, digits_npz):
    b = load_bundle(digits_bundle)
    m = b.manifest
    assert b.classes == tuple(str(i) for i in range(10))
    assert b.input.shape == (64,)
    assert set(m["files"]) == {"model.onnx", "weights.npz", "encoder.onnx", "head.npz",
                               "exemplars.npz"}
    assert m["arch"]["arch"] == "mlp"
    assert m["normalization"]["baked_into_graph"] is True
    assert len(m["normalization"]["mean"]) == 64
    assert m["onnx"] == {"input_name": "input", "output_name": "logits", "opset": 17,
                         "exporter": "torchscript"}
    assert set(m["versions"]) == {"torch", "onnx", "reverie", "python"}
    assert m["training"]["config"]["seed"] == 0
    assert m["training"]["metrics"]["test_accuracy"] > 0.9
    report = verify_bundle(digits_bundle, data=digits_npz)
    assert report.max_abs_diff["random"] <= 1e-4 and report.max_abs_diff["data"] <= 1e-4
    assert report.data_accuracy > 0.9


def test_synthetic_windows_bundle_loads_and_verifies(synthetic_bundle, synthetic_npz):
    b = load_bundle(synthetic_bundle)
    assert b.input.shape == (6, 128) and b.input.sample_rate_hz == 50.0
    assert b.input.channels[0] == "acc_x"
    assert b.manifest["arch"]["arch"] == "cnn1d"
    assert set(b.classes) == set(SYN_CLASSES)
    assert b.manifest["training"]["metrics"]["test_accuracy"] > 0.8
    report = verify_bundle(synthetic_bundle, data=synthetic_npz)
    assert report.max_abs_diff["data"] <= 1e-4


def test_weights_are_plain_float32_arrays(digits_bundle):
    with np.load(digits_bundle / "weights.npz", allow_pickle=False) as npz:
        assert "normalize.mean" in npz.files
        assert all(npz[k].dtype == np.float32 for k in npz.files)


def test_onnx_graph_has_a_dynamic_batch_axis(synthetic_bundle):
    proto = onnx.load(str(synthetic_bundle / "model.onnx"))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [6, 128]


def test_tampered_model_is_refused_naming_the_file(digits_bundle, tmp_path):
    copy = _copy(digits_bundle, tmp_path)
    with open(copy / "model.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 mismatch"):
        verify_bundle(copy)


def test_corrupt_onnx_with_matching_hashes_fails_the_checker(digits_bundle, tmp_path):
    copy = _copy(digits_bundle, tmp_path)
    (copy / "model.onnx").write_bytes(b"not a protobuf at all")
    write_manifest(copy, json.loads((copy / "manifest.json").read_text()))
    with pytest.raises(VerifyError, match=r"model\.onnx: not a valid ONNX model"):
        verify_bundle(copy)


def test_weights_that_disagree_with_the_graph_fail_parity(digits_bundle, tmp_path):
    copy = _copy(digits_bundle, tmp_path)
    with np.load(copy / "weights.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["dense.2.bias"] = arrays["dense.2.bias"] + np.float32(0.01)
    np.savez(copy / "weights.npz", **arrays)
    write_manifest(copy, json.loads((copy / "manifest.json").read_text()))
    with pytest.raises(VerifyError, match="parity on random inputs"):
        verify_bundle(copy)


def test_training_is_deterministic_for_a_seed(digits_npz):
    ds = load_dataset(digits_npz)
    cfg = TrainConfig(epochs=2, seed=3)
    a, _ = train(ds, cfg, verbose=False)
    b, _ = train(ds, cfg, verbose=False)
    c, _ = train(ds, TrainConfig(epochs=2, seed=4), verbose=False)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.state_dict()["dense.2.weight"], c.state_dict()["dense.2.weight"])


def test_failed_write_leaves_no_bundle(digits_npz, tmp_path):
    out = tmp_path / "b"

    def reject(staging):
        assert (staging / "manifest.json").is_file()  # complete, but not yet in place
        raise VerifyError("rejected by the test")

    import export.pipeline as pipeline

    real = pipeline.write_bundle
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "write_bundle",
                   lambda *a, **kw: real(*a, **{**kw, "check": reject}))
        with pytest.raises(VerifyError):
            train_bundle(digits_npz, out, epochs=1, verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force_and_force_replaces_only_bundles(digits_npz, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="pass --force"):
        train_bundle(digits_npz, out, epochs=1, verbose=False)
    with pytest.raises(ConfigError, match="not a bundle"):
        train_bundle(digits_npz, out, epochs=1, force=True, verbose=False)
    assert (out / "notes.txt").read_text() == "mine"

    (out / "notes.txt").unlink()
    train_bundle(digits_npz, out, epochs=1, verbose=False, name="first")
    train_bundle(digits_npz, out, epochs=1, verbose=False, name="second", force=True)
    assert load_bundle(out).manifest["name"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging leftovers
