import json

import numpy as np
import pytest
import torch

from agent.errors import ConfigError
from export.model import ArchConfig, build_model, normalization_stats


def test_arch_is_chosen_from_the_data_shape():
    assert ArchConfig.for_data((6, 128), 3).arch == "minirocket"  # issue 12 (was cnn1d)
    assert ArchConfig.for_data((64,), 10).arch == "mlp"
    assert ArchConfig.for_data((6, 128), 3, arch="mlp").arch == "mlp"


@pytest.mark.parametrize("shape", [(6, 128), (64,)])
def test_arch_config_round_trips_through_json(shape):
    cfg = ArchConfig.for_data(shape, 4, hidden=(16, 8), split="late")
    assert cfg.split == 2 and cfg.latent_dim == 8
    assert ArchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("bad, match", [
    ({"arch": "rnn"}, "arch='rnn'"),
    ({"arch": "cnn1d", "input_shape": (64,)}, "cnn1d"),
    ({"n_classes": 1}, "n_classes=1"),
    ({"dropout": 1.0}, "dropout"),
    ({"channels": (8, 8), "kernel_sizes": (3,)}, "equal length"),
    ({"split": 0}, r"split=0, expected an integer in \[1, 2\]"),
    ({"split": "middle"}, "split='middle'"),
    ({"hidden": ()}, "at least one hidden layer"),
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


@pytest.mark.parametrize("shape, arch, split, latent_dim", [
    ((6, 32), "cnn1d", "early", 16), ((6, 32), "cnn1d", 1, 24), ((6, 32), "cnn1d", "late", 12),
    ((6, 32), "mlp", "early", 24), ((20,), "mlp", "late", 12)])
def test_model_maps_raw_inputs_to_logits_through_an_explicit_latent(shape, arch, split,
                                                                     latent_dim):
    cfg = ArchConfig.for_data(shape, 5, arch=arch, hidden=(24, 12), channels=(8, 16),
                              kernel_sizes=(5, 3), split=split)
    assert cfg.latent_dim == latent_dim
    model = build_model(cfg, np.zeros(shape[0]), np.ones(shape[0])).eval()
    x = torch.randn(3, *shape)
    assert model.embed(x).shape == (3, latent_dim)
    assert model(x).shape == (3, 5)
    assert torch.equal(model.head(model.embed(x)), model(x))


def test_split_names_resolve_per_arch():
    assert ArchConfig.for_data((64,), 3).split == 1            # default: early
    assert ArchConfig.for_data((6, 32), 3, "cnn1d").split == 0
    assert ArchConfig.for_data((6, 32), 3, "cnn1d", split="late").split == 2
    assert ArchConfig.for_data((6, 32), 3, "cnn1d", split="1").split == 1
    assert ArchConfig.for_data((6, 32), 3, split="late").split == 1  # minirocket: (128,)


def test_normalization_is_per_channel_for_windows_and_baked_in():
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((50, 3, 40)) * [[2.0], [0.5], [0.0]] + [[1.0], [-4.0], [7.0]])
    mean, std = normalization_stats(X)
    np.testing.assert_allclose(mean, X.mean(axis=(0, 2)), rtol=1e-5)
    assert std[2] == 1.0  # a constant channel maps to 0, not to inf
    # A nearly constant channel is floored at a tenth of the median std of the others.
    X2 = X * [[1.0], [1e-4], [1.0]]
    _, std2 = normalization_stats(X2)
    raw = X2.std(axis=(0, 2))[:2]
    assert std2[1] == pytest.approx(0.1 * np.median(raw), rel=1e-4)
    assert std2[0] == pytest.approx(raw[0], rel=1e-4) and std2[2] == 1.0
