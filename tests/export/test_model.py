import json

import numpy as np
import pytest
import torch

from agent.errors import ConfigError
from export.model import ArchConfig, build_model, normalization_stats


def test_arch_is_chosen_from_the_data_shape():
    assert ArchConfig.for_data((6, 128), 3).arch == "cnn1d"
    assert ArchConfig.for_data((64,), 10).arch == "mlp"
    assert ArchConfig.for_data((6, 128), 3, arch="mlp").arch == "mlp"


@pytest.mark.parametrize("shape", [(6, 128), (64,)])
def test_arch_config_round_trips_through_json(shape):
    cfg = ArchConfig.for_data(shape, 4, latent_dim=16)
    assert ArchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("bad, match", [
    ({"arch": "rnn"}, "arch='rnn'"),
    ({"arch": "cnn1d", "input_shape": (64,)}, "cnn1d"),
    ({"n_classes": 1}, "n_classes=1"),
    ({"dropout": 1.0}, "dropout"),
    ({"channels": (8, 8), "kernel_sizes": (3,)}, "equal length"),
])
def test_arch_config_validates_itself(bad, match):
    kw = {"arch": "mlp", "input_shape": (6, 16), "n_classes": 3, **bad}
    with pytest.raises(ConfigError, match=match):
        ArchConfig(**kw)


def test_from_dict_refuses_unknown_and_missing_keys():
    raw = ArchConfig.for_data((8,), 2).to_dict()
    with pytest.raises(ConfigError, match="unknown key"):
        ArchConfig.from_dict({**raw, "depth": 3})
    del raw["n_classes"]
    with pytest.raises(ConfigError, match="n_classes"):
        ArchConfig.from_dict(raw)


@pytest.mark.parametrize("shape, arch", [((6, 32), "cnn1d"), ((6, 32), "mlp"), ((20,), "mlp")])
def test_model_maps_raw_inputs_to_logits_through_an_explicit_latent(shape, arch):
    cfg = ArchConfig.for_data(shape, 5, arch=arch, latent_dim=12)
    model = build_model(cfg, np.zeros(shape[0]), np.ones(shape[0])).eval()
    x = torch.randn(3, *shape)
    assert model.embed(x).shape == (3, 12)
    assert model(x).shape == (3, 5)
    assert torch.equal(model.head(model.encoder(model.normalize(x))), model(x))


def test_normalization_is_per_channel_for_windows_and_baked_in():
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((50, 3, 40)) * [[2.0], [0.5], [0.0]] + [[1.0], [-4.0], [7.0]])
    mean, std = normalization_stats(X)
    np.testing.assert_allclose(mean, X.mean(axis=(0, 2)), rtol=1e-5)
    assert std[2] == 1.0  # a constant channel maps to 0, not to inf
    model = build_model(ArchConfig.for_data((3, 40), 2), mean, std)
    z = model.normalize(torch.from_numpy(X.astype(np.float32))).numpy()
    np.testing.assert_allclose(z.mean(axis=(0, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 2))[:2], 1.0, rtol=1e-3)
