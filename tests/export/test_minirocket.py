"""MiniRocket in torch against the slow obvious loop (`ppv_oracle`), its ONNX export, and
the minirocket arch end to end (train, bundle, verify, device encoder)."""

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError
from export.minirocket import (
    KERNEL_INDICES,
    N_KERNELS,
    MiniRocket,
    MiniRocketFeatures,
    fit_dilations,
    fit_minirocket,
    kernel_weights,
    ppv_oracle,
    principal_axes,
)

TIE_EPS = 1e-4  # float32 torch vs float64 oracle: a conv value this close to a bias may go either way


def _check_against_oracle(C: int, T: int, n_features: int, seed: int, n: int = 4) -> None:
    rng = np.random.default_rng(seed)
    X_fit = rng.standard_normal((12, C, T)).astype(np.float32)
    X = rng.standard_normal((n, C, T)).astype(np.float32)
    params = fit_minirocket(X_fit, n_features, seed)
    got = MiniRocket(C, T, n_features).load_params(params)(torch.from_numpy(X)).numpy()
    lo, hi = ppv_oracle(params, X, TIE_EPS)
    assert got.shape == (n, n_features)
    assert np.all(got >= lo - 1e-6) and np.all(got <= hi + 1e-6)
    # Near ties are rare: almost every feature is exactly the oracle's.
    assert np.mean(np.abs(got - lo) < 1e-6) > 0.99


@pytest.mark.parametrize("C, T, n_features", [(1, 30, 84), (3, 64, 168), (6, 128, 252)])
def test_torch_transform_matches_the_loop_oracle(C, T, n_features):
    _check_against_oracle(C, T, n_features, seed=C)


@settings(max_examples=12, deadline=None)
@given(C=st.integers(1, 4), T=st.integers(10, 48), multiple=st.integers(1, 2),
       seed=st.integers(0, 2 ** 16))
def test_torch_transform_matches_the_oracle_on_random_shapes(C, T, multiple, seed):
    _check_against_oracle(C, T, N_KERNELS * multiple, seed, n=2)


def test_kernels_and_dilations_follow_the_reference():
    w = kernel_weights()
    assert w.shape == (84, 9) and set(np.unique(w)) == {-1.0, 2.0}
    assert np.all((w == 2).sum(axis=1) == 3) and np.all(w.sum(axis=1) == 0)
    assert len({tuple(r) for r in KERNEL_INDICES}) == 84
    dil, per = fit_dilations(128, 1680)
    assert dil[0] == 1 and dil[-1] <= (128 - 1) / 8 and np.all(np.diff(dil) > 0)
    assert per.sum() == 1680 // 84


def test_fit_is_seeded_and_uses_channel_subsets():
    X = np.random.default_rng(0).standard_normal((10, 5, 40)).astype(np.float32)
    a, b, c = (fit_minirocket(X, 168, s) for s in (3, 3, 4))
    assert np.array_equal(a.biases, b.biases) and np.array_equal(a.channel_mask, b.channel_mask)
    assert not np.array_equal(a.biases, c.biases)
    used = a.channel_mask.sum(axis=-1)                       # (D, 84)
    assert used.min() >= 1 and used.max() <= 5 and used.max() > 1


@pytest.mark.parametrize("bad", [0, 83, 100])
def test_feature_count_must_be_a_multiple_of_84(bad):
    with pytest.raises(ConfigError, match="multiple of 84"):
        MiniRocket(1, 64, bad)


def test_onnx_export_matches_torch(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((16, 3, 100)).astype(np.float32)
    feats = MiniRocketFeatures(3, 100, 336, "pca", 32).fit(torch.from_numpy(X), seed=0).eval()
    path = tmp_path / "mr.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(feats, (torch.zeros(2, 3, 100),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["z"],
                          dynamic_axes={"x": {0: "b"}, "z": {0: "b"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    Xt = rng.standard_normal((5, 3, 100)).astype(np.float32)
    got = sess.run(None, {"x": Xt})[0]
    with torch.no_grad():
        ref = feats(torch.from_numpy(Xt)).numpy()
    assert got.shape == (5, 32)
    assert np.max(np.abs(got - ref)) <= 1e-4 * max(1.0, np.abs(ref).max())


def test_principal_axes_are_orthonormal_even_beyond_the_data_rank():
    Z = torch.randn(6, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    V = principal_axes(Z, 10, torch.Generator().manual_seed(1))   # rank 5 < 10
    assert V.shape == (40, 10)
    assert torch.allclose(V.T @ V, torch.eye(10, dtype=torch.float64), atol=1e-8)


@pytest.mark.parametrize("reduce, dim", [("pca", 24), ("random", 24), ("none", 168)])
def test_features_module_standardizes_and_reduces(reduce, dim):
    X = torch.randn(30, 2, 50, generator=torch.Generator().manual_seed(0))
    feats = MiniRocketFeatures(2, 50, 168, reduce, 24).fit(X, seed=0)
    Z = feats(X)
    assert Z.shape == (30, dim)
    if reduce == "none":
        assert torch.allclose(Z.mean(dim=0), torch.zeros(dim), atol=1e-4)


# --- the minirocket arch: config, training, bundle ---------------------------------------

SMALL = {"n_features": 168, "reduce_dim": 16}


def test_arch_config_validates_minirocket_options():
    from export.model import ArchConfig

    cfg = ArchConfig.for_data((6, 128), 3, "minirocket", **SMALL)
    assert (cfg.latent_dim, cfg.split, cfg.hidden) == (16, 0, (128,))
    assert ArchConfig.for_data((6, 128), 3, "minirocket", n_features=168,
                               reduce="none").latent_dim == 168
    for bad, match in [({"n_features": 100}, "multiple of 84"), ({"reduce": "umap"}, "reduce"),
                       ({"reduce_dim": 500}, "reduce_dim"), ({"input_shape": (64,)}, "windows")]:
        with pytest.raises(ConfigError, match=match):
            ArchConfig(**{"arch": "minirocket", "input_shape": (6, 128), "n_classes": 3,
                          **SMALL, **bad})


def test_an_old_manifest_arch_dict_still_reads():
    from export.model import ArchConfig

    old = {"arch": "cnn1d", "input_shape": [6, 128], "n_classes": 4, "hidden": [128, 64],
           "split": 0, "channels": [32, 64, 64], "kernel_sizes": [7, 5, 3], "dropout": 0.1}
    cfg = ArchConfig.from_dict(old)
    assert cfg.arch == "cnn1d" and cfg.latent_dim == 64


@pytest.fixture(scope="module")
def minirocket_bundle(tmp_path_factory, synthetic_npz):
    from export import train_bundle

    return train_bundle(synthetic_npz, tmp_path_factory.mktemp("bundles") / "mr", epochs=6,
                        arch="minirocket", arch_options=SMALL, verbose=False)


def test_minirocket_bundle_verifies_and_runs_on_the_device(minirocket_bundle, synthetic_npz):
    from agent.bundle import load_bundle
    from agent.dataset import load_dataset
    from agent.inference import Encoder
    from export import verify_bundle

    report = verify_bundle(minirocket_bundle, synthetic_npz)
    assert report.data_accuracy > 0.8
    bundle = load_bundle(minirocket_bundle)
    assert bundle.manifest["arch"]["arch"] == "minirocket"
    assert bundle.manifest["latent_dim"] == 16
    ds = load_dataset(synthetic_npz)
    Z = Encoder(bundle).encode(ds.X_test[:8])
    assert Z.shape == (8, 16) and np.isfinite(Z).all()


def test_minirocket_training_is_seeded_with_augmentation(synthetic_npz):
    from agent.dataset import load_dataset
    from export.model import ArchConfig
    from export.train import TrainConfig, train

    ds = load_dataset(synthetic_npz)
    arch = ArchConfig.for_data(ds.input_shape, len(ds.classes), "minirocket", **SMALL)
    cfg = TrainConfig(epochs=2, augment=True, augment_copies=1)
    (a, _), (b, _) = (train(ds, cfg, arch, verbose=False) for _ in range(2))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_quantize_writes_a_working_int8_bundle_or_refuses_in_one_line(
        minirocket_bundle, synthetic_npz, tmp_path):
    """PPV thresholds may not survive static int8: the accuracy gate must then refuse."""
    from export import verify_bundle
    from export.errors import QuantizeError
    from export.quantize import quantize_bundle

    out = tmp_path / "mr-int8"
    try:
        quantize_bundle(minirocket_bundle, synthetic_npz, out, iterations=20)
    except QuantizeError as exc:
        assert "\n" not in str(exc) and not out.exists()
        return
    report = verify_bundle(out, synthetic_npz)
    assert report.quantized and report.data_accuracy > 0.8
