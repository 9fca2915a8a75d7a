"""Replay sampling: held-out split per class, class balance, pseudo-latents, config checks."""

import numpy as np
import pytest

from agent.errors import ConfigError
from agent.learner import SleepConfig
from agent.sleep.replay import EpisodeSet, ReplayStream, holdout_mask


def _episodes(counts, d=8, seed=0) -> EpisodeSet:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    latents = (np.abs(rng.standard_normal((labels.shape[0], d))) + labels[:, None]).astype(np.float32)
    surprise = rng.random(labels.shape[0]).astype(np.float32)
    return EpisodeSet(np.arange(labels.shape[0], dtype=np.uint64), latents, labels, surprise)


def test_holdout_takes_a_rounded_share_of_each_class_and_leaves_one_to_train():
    labels = np.repeat(np.arange(5), [1, 2, 3, 10, 40])
    held = holdout_mask(labels, 0.2, np.random.default_rng(0))
    per_class = np.bincount(labels[held], minlength=5)
    np.testing.assert_array_equal(per_class, [0, 0, 1, 2, 8])
    assert not holdout_mask(labels, 0.0, np.random.default_rng(0)).any()
    assert (np.bincount(labels[~holdout_mask(labels, 0.99, np.random.default_rng(0))]) >= 1).all()


def test_replay_is_class_balanced_and_marks_pseudo_latents():
    eps = _episodes([40, 40, 3])                       # class 2 is thin: pseudo-latents
    stream = ReplayStream(eps, 3, surprise_share=0.5, pseudo_below=10, pseudo_share=0.5, seed=1)
    X, y, rows = stream.draw(3000)
    assert X.shape == (3000, 8) and X.dtype == np.float32
    np.testing.assert_allclose(np.bincount(y) / 3000, 1 / 3, atol=0.02)
    real = rows >= 0
    np.testing.assert_array_equal(y[real], eps.labels[rows[real]])
    np.testing.assert_array_equal(X[real], eps.latents[rows[real]])
    assert (rows[y < 2] >= 0).all()                    # well-stocked classes: real only
    fake = ~real
    assert 0.4 < fake[y == 2].mean() < 0.6             # pseudo_share of the thin class
    assert (X[fake] >= eps.latents.min(axis=0)).all()  # clipped at the smallest value seen
    # Pseudo-latents follow the class: nearer its mean than any other class's.
    means = np.stack([eps.latents[eps.labels == c].mean(axis=0) for c in range(3)])
    nearest = np.linalg.norm(X[fake][:, None] - means[None], axis=2).argmin(axis=1)
    assert (nearest == 2).mean() > 0.9


def test_surprise_share_prioritizes_surprising_episodes():
    eps = _episodes([50])
    surprise = np.zeros(50, np.float32)
    surprise[:5] = 1.0
    eps = EpisodeSet(eps.ids, eps.latents, eps.labels, surprise)
    all_surprise = ReplayStream(eps, 1, surprise_share=1.0, pseudo_below=0, pseudo_share=0,
                                seed=0).draw(500)[2]
    assert (all_surprise < 5).all()
    mixed = ReplayStream(eps, 1, surprise_share=0.5, pseudo_below=0, pseudo_share=0,
                         seed=0).draw(1000)[2]
    assert 0.5 < (mixed < 5).mean() < 0.6              # half + the uniform half's 10%


def test_replay_is_deterministic_in_seed():
    eps = _episodes([20, 4])
    a = ReplayStream(eps, 2, surprise_share=0.5, pseudo_below=10, pseudo_share=0.5, seed=3)
    b = ReplayStream(eps, 2, surprise_share=0.5, pseudo_below=10, pseudo_share=0.5, seed=3)
    for _ in range(2):
        for u, v in zip(a.draw(64), b.draw(64), strict=True):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("field, value", [
    ("rank", 0), ("rank", 4.0), ("batch_size", 0), ("lr", 0.0), ("beta2", 1.0),
    ("holdout_fraction", 1.0), ("max_old_drop", -0.01), ("forget_factor", 1.5),
    ("distill_temperature", 0), ("min_held_out", 0), ("max_class_drop", 1.5),
    ("min_class_held_out", 0),
])
def test_sleep_config_names_the_bad_field(field, value):
    with pytest.raises(ConfigError, match=f"sleep.{field}="):
        SleepConfig(**{field: value})
