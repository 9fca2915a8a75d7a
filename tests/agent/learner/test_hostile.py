"""What a hostile or careless sender can do to a learner's state (issue 13): nothing it
learned is lost, a record it cannot apply never stops a restart, and one sender cannot
grow the classes, the checkpoint or an episode's lifetime without bound."""

import json

import numpy as np
import pytest

from agent.errors import InputError
from agent.learner import Learner, LearnerConfig
from agent.learner.learner import MAX_CLOCK_SKEW_S, key_digest
from agent.learner.state import LearnerState
from tests.agent.learner.conftest import windows


def test_a_latent_the_memory_would_refuse_is_refused_before_the_log(base_bundle, tmp_path):
    """A latent beyond float16's range used to be logged (fsynced) and then refused by
    the memory: after any unclean stop the replay raised and the agent never started."""
    cfg = LearnerConfig(capacity=100, latent_dtype="float16")
    with Learner.from_bundle(base_bundle, cfg, state_dir=tmp_path / "s") as L:
        huge = np.full(L.latent_dim, 1e5, np.float32)
        last = L.state.wal.last_seq
        with pytest.raises(InputError, match="float16"):
            L.learn_latent(huge, "tilt", key="evil")
        assert L.state.wal.last_seq == last and not L.seen("evil")
        L.learn_one(windows("tilt", 1)[0], "tilt", key="good")
    with Learner.load(tmp_path / "s", base_bundle, cfg) as again:
        assert again.seen("good") and not again.recovery_warnings


def test_a_log_record_that_cannot_be_applied_is_skipped_and_reported(base_bundle, tmp_path):
    cfg = LearnerConfig(capacity=100, latent_dtype="float16")
    with Learner.from_bundle(base_bundle, cfg, state_dir=tmp_path / "s") as L:
        L.learn_one(windows("tilt", 1)[0], "tilt", key="a")
        bad = np.full(L.latent_dim, 1e5, np.float32)   # written by an older, trusting build
        L.state.log(LearnerState.encode_episode(bad, "evil", 1.0, 0.0, "k"), durable=True)
        L.state.log(LearnerState.encode_episode(bad[:3], "evil", 1.0, 0.0), durable=True)
        L.learn_one(windows("shake", 1)[0], "shake", key="b")
    with Learner.load(tmp_path / "s", base_bundle, cfg) as again:
        assert again.replay_skipped == 2
        assert len(again.recovery_warnings) == 2
        assert all("skipped" in w for w in again.recovery_warnings)
        assert again.seen("a") and again.seen("b") and "evil" not in again.classes


def test_label_keys_are_kept_as_digests(base_bundle, tmp_path):
    """256 emoji per key used to cost ~3 kB each in meta.json (12 bytes per escaped emoji):
    a dozen labels naming many windows pushed every checkpoint past its size limit."""
    cfg = LearnerConfig(capacity=100, surprise_threshold=1.0, min_class_episodes=0,
                        store_confident_rate=0.0)
    keys = ["\U0001f600" * 200 + str(i) for i in range(300)]
    x = windows("idle", 1)[0]
    with Learner.from_bundle(base_bundle, cfg, state_dir=tmp_path / "s") as L:
        for k in keys:
            L.learn_one(x, "idle", key=k)
        number = L.checkpoint()
    meta = (tmp_path / "s" / "checkpoints" / f"{number:08d}" / "meta.json")
    if not meta.exists():            # the store's layout: find the checkpoint's meta
        meta = next((tmp_path / "s").rglob("meta.json"))
    text = meta.read_text()
    assert "\\ud83d" not in text and len(text) < 60_000
    assert json.loads(text)                                    # still a checkpoint
    with Learner.load(tmp_path / "s", base_bundle, cfg) as again:
        assert all(again.seen(k) for k in keys) and not again.seen("other")
        assert again.learn_one(x, "idle", key=keys[0]).duplicate
    assert key_digest(keys[0]) != key_digest(keys[1]) and len(key_digest(keys[0])) == 32


def test_a_timestamp_from_the_future_cannot_pin_an_episode(base_bundle):
    import time

    with Learner.from_bundle(base_bundle, LearnerConfig(capacity=100)) as L:
        r = L.learn_one(windows("tilt", 1)[0], "tilt", ts=1e300)
        created = L.memory.get([r.episode_id]).created_ts[0]
        assert created <= time.time() + MAX_CLOCK_SKEW_S
        with pytest.raises(InputError, match="ts="):
            L.learn_one(windows("tilt", 1)[0], "tilt", ts=float("nan"))


def test_new_classes_are_bounded_in_number_and_rate(base_bundle):
    x = windows("tilt", 1)[0]
    cfg = LearnerConfig(capacity=100, max_classes=7, max_new_classes_per_hour=100)
    with Learner.from_bundle(base_bundle, cfg) as L:
        n0 = len(L.classes)
        for i in range(7 - n0):
            L.learn_one(x, f"c{i}")
        with pytest.raises(InputError, match="max_classes=7"):
            L.learn_one(x, "one-too-many")
        L.learn_one(x, "c0")                                   # known classes still learn
    with Learner.from_bundle(base_bundle, LearnerConfig(capacity=100,
                                                        max_new_classes_per_hour=2)) as L:
        L.learn_one(x, "a")
        L.learn_one(x, "b")
        with pytest.raises(InputError, match="max_new_classes_per_hour=2"):
            L.learn_one(x, "c")
        assert L.classes[-2:] == ["a", "b"]


def test_files_swapped_after_the_bundle_was_loaded_are_never_read(base_bundle, tmp_path):
    """A learner built after head.npz / exemplars.npz were replaced on disk uses the bytes
    load_bundle hashed (issue 13: a swapped head.npz was used by a new per-device learner)."""
    import shutil

    from agent.bundle import load_bundle

    copy = tmp_path / "b"
    shutil.copytree(base_bundle, copy)
    bundle = load_bundle(copy)
    with Learner(bundle, LearnerConfig(capacity=100)) as before:
        want = before.predict_many(windows("run", 3, seed=1))
    for name in ("head.npz", "exemplars.npz"):
        (copy / name).write_bytes(b"not an npz at all")
    with Learner(bundle, LearnerConfig(capacity=100)) as after:
        got = after.predict_many(windows("run", 3, seed=1))
    np.testing.assert_allclose([p.probs for p in got], [p.probs for p in want])
