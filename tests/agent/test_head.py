"""agent.head.Head (numpy) and agent.inference.Encoder against slow oracles and model.onnx."""

import numpy as np
import pytest

from agent.bundle import load_bundle
from agent.errors import BundleError
from agent.head import Head
from agent.inference import Classifier, Encoder, make_session, softmax


def _random_head(rng, dims, activation="relu"):
    Ws = [rng.standard_normal((o, i)).astype(np.float32) for i, o in zip(dims[:-1], dims[1:], strict=True)]
    bs = [rng.standard_normal(o).astype(np.float32) for o in dims[1:]]
    return Head(Ws, bs, activation), Ws, bs


def _oracle(Ws, bs, x, relu=True):
    """One unit at a time, in float64."""
    h = [list(map(float, row)) for row in x]
    for n, (W, b) in enumerate(zip(Ws, bs, strict=True)):
        out = []
        for row in h:
            z = [float(b[o]) + sum(float(W[o, i]) * row[i] for i in range(W.shape[1]))
                 for o in range(W.shape[0])]
            last = n == len(Ws) - 1
            out.append([max(v, 0.0) if relu and not last else v for v in z])
        h = out
    return np.array(h)


@pytest.mark.parametrize("dims", [(6, 3), (8, 5, 4), (7, 9, 6, 2)])
def test_head_matches_a_slow_oracle(dims):
    rng = np.random.default_rng(len(dims))
    head, Ws, bs = _random_head(rng, dims)
    x = rng.standard_normal((5, dims[0])).astype(np.float32)
    got = head.logits(x)
    assert got.shape == (5, dims[-1]) and got.dtype == np.float32
    np.testing.assert_allclose(got, _oracle(Ws, bs, x), rtol=1e-5, atol=1e-5)
    assert head.n_layers == len(dims) - 1 and head.latent_dim == dims[0]
    assert head.n_classes == dims[-1]


def test_head_rejects_bad_shapes_naming_the_expected_one():
    head, _, _ = _random_head(np.random.default_rng(0), (8, 4, 3))
    with pytest.raises(ValueError, match=r"latents have shape \(2, 7\), expected \(B, 8\)"):
        head.logits(np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match=r"expected \(B, 8\)"):
        head.logits(np.zeros(8, np.float32))
    rng = np.random.default_rng(1)
    with pytest.raises(BundleError, match=r"W1 has shape \(3, 5\), expected \(3, 4\)"):
        Head([rng.standard_normal((4, 8)).astype("f4"), rng.standard_normal((3, 5)).astype("f4")],
             [np.zeros(4, "f4"), np.zeros(3, "f4")])
    with pytest.raises(BundleError, match="expected float32"):
        Head([np.zeros((3, 8))], [np.zeros(3, "f4")])
    with pytest.raises(BundleError, match="activation='gelu'"):
        Head([np.zeros((3, 8), "f4")], [np.zeros(3, "f4")], "gelu")


def _save(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


MANIFEST = {"latent_dim": 8, "classes": ["a", "b", "c"], "head": {"activation": "relu"}}


@pytest.mark.parametrize("arrays, match", [
    ({"W0": np.zeros((3, 8), "f4"), "b0": np.zeros(3, "f4")}, "n_layers=None"),
    ({"n_layers": np.array(2), "W0": np.zeros((3, 8), "f4"), "b0": np.zeros(3, "f4")},
     r"missing \['W1', 'b1'\]"),
    ({"n_layers": np.array(1), "W0": np.zeros((3, 6), "f4"), "b0": np.zeros(3, "f4")},
     "W0 takes 6 inputs, the manifest's latent_dim is 8"),
    ({"n_layers": np.array(1), "W0": np.zeros((4, 8), "f4"), "b0": np.zeros(4, "f4")},
     "4 outputs, the manifest lists 3 classes"),
    ({"n_layers": np.array(1), "W0": np.zeros((3, 8), object), "b0": np.zeros(3, "f4")},
     "not a readable head file"),
    ({"n_layers": np.array(1), "W0": np.full((3, 8), np.nan, "f4"), "b0": np.zeros(3, "f4")},
     "NaN/Inf"),
])
def test_from_npz_refuses_malformed_files(tmp_path, arrays, match):
    path = _save(tmp_path / "head.npz", **arrays)
    with pytest.raises(BundleError, match=match):
        Head.from_npz(path, MANIFEST)


def test_encoder_plus_numpy_head_equals_model_onnx(sim_bundle):
    bundle = load_bundle(sim_bundle)
    encoder = Encoder(bundle)
    head = Head.from_npz(bundle.file("head.npz"), bundle.manifest)
    assert encoder.latent_dim == head.latent_dim == bundle.manifest["latent_dim"]
    X = (np.random.default_rng(0).standard_normal((32, *bundle.input.shape)) * 0.5
         ).astype(np.float32)
    latents = encoder.encode(X)
    assert latents.shape == (32, head.latent_dim) and latents.dtype == np.float32
    logits = head.logits(latents)
    session = make_session(bundle.file("model.onnx"))
    (ref,) = session.run(None, {"input": X})
    np.testing.assert_allclose(logits, ref, atol=1e-4)
    np.testing.assert_allclose(softmax(logits.astype(np.float64)),
                               Classifier(bundle).predict_proba(X), atol=1e-5)


def test_encoder_rejects_wrong_window_shapes(sim_bundle):
    encoder = Encoder(load_bundle(sim_bundle))
    with pytest.raises(ValueError, match=r"expected \(B, 6, 128\)"):
        encoder.encode(np.zeros((2, 6, 64), np.float32))
    with pytest.raises(ValueError, match=r"expected \(B, 6, 128\)"):
        encoder.encode(np.zeros((6, 128), np.float32))
