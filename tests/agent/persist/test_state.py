"""StateDir: checkpoint + log together, as a Learner will use them."""

import errno
import os

import numpy as np
import pytest

from agent.errors import StateError
from agent.persist import StateDir, decode_record, encode_record


def episode(i, dim=4):
    return encode_record({"episode": i}, {"h": np.full(dim, i, np.float32)})


def episodes(records):
    return [decode_record(p)[0]["episode"] for _, p in records]


def snapshot(ids):
    return {"ids": np.array(ids, np.int64)}


def test_life_cycle(tmp_path):
    with StateDir(tmp_path) as state:
        rec = state.recover()
        assert rec.checkpoint is None and rec.records == [] and rec.warnings == [] and rec.last_seq == 0
        for i in range(1, 4):
            assert state.log(episode(i)) == i
        assert state.checkpoint(snapshot([1, 2, 3]), info={"n": 3}) == 1
        state.log(episode(4))
        state.log(episode(5), durable=False)
    with StateDir(tmp_path) as state:
        rec = state.recover()
        assert rec.checkpoint.wal_seq == 3 and list(rec.checkpoint.arrays["ids"]) == [1, 2, 3]
        assert episodes(rec.records) == [4, 5] and rec.last_seq == 5 and rec.warnings == []
        assert state.log(episode(6)) == 6


def test_writes_before_recover_are_refused(tmp_path):
    with StateDir(tmp_path) as state:
        with pytest.raises(StateError, match="recover"):
            state.log(b"x")
        with pytest.raises(StateError, match="recover"):
            state.checkpoint({})


def test_one_process_at_a_time(tmp_path):
    with StateDir(tmp_path):
        with pytest.raises(StateError, match="in use"):
            StateDir(tmp_path)
    StateDir(tmp_path).close()  # released on close


def fill_with_checkpoints(state, n_ckpt, per=3):
    ids = []
    for _ in range(n_ckpt):
        for _ in range(per):
            ids.append(len(ids) + 1)
            state.log(episode(ids[-1]))
        state.checkpoint(snapshot(ids), info={"n": len(ids)})
    ids.append(len(ids) + 1)
    state.log(episode(ids[-1]))
    return ids


def rebuild(rec):
    ids = list(rec.checkpoint.arrays["ids"]) if rec.checkpoint else []
    return ids + episodes(rec.records)


def test_fallback_to_an_older_checkpoint_still_replays_everything(tmp_path):
    with StateDir(tmp_path, keep_checkpoints=3) as state:
        state.recover()
        ids = fill_with_checkpoints(state, 5)
        newest = state.store.path_of(5)
    (newest / "ids.npy").write_bytes(b"garbage")
    with StateDir(tmp_path) as state:
        rec = state.recover()
        assert rec.checkpoint.number == 4 and "000005" in rec.warnings[0]
        assert rebuild(rec) == ids  # the log still held the records checkpoint 5 covered
        assert state.log(episode(99)) == len(ids) + 1


def test_log_segments_are_trimmed_to_the_oldest_retained_checkpoint(tmp_path):
    with StateDir(tmp_path, keep_checkpoints=2) as state:
        state.recover()
        fill_with_checkpoints(state, 6)
        first = int(state.wal.segments[0].name[4:16])
        oldest_kept = min(state.store.covered_seqs().values())
        assert first <= oldest_kept + 1 and len(state.wal.segments) <= 3


def test_all_checkpoints_damaged_starts_empty_and_says_so(tmp_path):
    with StateDir(tmp_path, keep_checkpoints=2) as state:
        state.recover()
        fill_with_checkpoints(state, 3)
    for n in (2, 3):
        (tmp_path / "checkpoints" / f"{n:06d}" / "ids.npy").write_bytes(b"x")
    with StateDir(tmp_path) as state:
        rec = state.recover()
        assert rec.checkpoint is None
        assert any("no usable checkpoint" in w for w in rec.warnings)
        assert any("missing" in w for w in rec.warnings)  # the log's start was trimmed
        seq = state.log(b"x")
        assert seq > 9  # never reuses a seq a checkpoint on disk claims
    with StateDir(tmp_path, strict=True) as state, pytest.raises(StateError):
        state.recover()


def test_disk_full_during_checkpoint_keeps_the_old_state(tmp_path, faulty_disk, monkeypatch):
    with StateDir(tmp_path) as state:
        state.recover()
        ids = fill_with_checkpoints(state, 2)
        faulty_disk(fail_at=2)
        with pytest.raises(StateError, match="ENOSPC"):
            state.checkpoint(snapshot(ids) | {"big": np.zeros(10_000)})
        monkeypatch.undo()
        state.log(episode(len(ids) + 1))  # learning goes on
        ids.append(len(ids) + 1)
    with StateDir(tmp_path) as state:
        rec = state.recover()
        assert rec.warnings == [] and rec.checkpoint.number == 2 and rebuild(rec) == ids


def test_disk_full_during_log_keeps_every_acknowledged_record(tmp_path, faulty_disk, monkeypatch):
    with StateDir(tmp_path) as state:
        state.recover()
        ids = fill_with_checkpoints(state, 1)
        faulty_disk(fail_at=1, err=errno.ENOSPC)
        with pytest.raises(StateError, match=r"wal-\d+\.log.*ENOSPC"):
            state.log(episode(100))
        monkeypatch.undo()
    with StateDir(tmp_path) as state:
        rec = state.recover()
        assert rec.warnings == [] and rebuild(rec) == ids


def test_corrupt_log_record_keeps_the_prefix_and_reports(tmp_path, caplog):
    with StateDir(tmp_path) as state:
        state.recover()
        ids = fill_with_checkpoints(state, 1)
        for i in range(5):
            state.log(episode(len(ids) + 1 + i))
        seg = state.wal.segments[-1]
    raw = bytearray(seg.read_bytes())
    raw[-60] ^= 0x20
    seg.write_bytes(bytes(raw))
    with StateDir(tmp_path) as state:
        rec = state.recover()
        got = rebuild(rec)
        assert got == list(range(1, len(got) + 1)) and len(got) < len(ids) + 5
        assert len(rec.warnings) == 1 and str(seg) in rec.warnings[0]
        assert "log corrupt" in caplog.text
        assert state.log(b"next") == got[-1] + 1


def test_hnswlib_index_is_verified_before_it_is_loaded(tmp_path):
    hnswlib = pytest.importorskip("hnswlib")
    data = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    index = hnswlib.Index(space="cosine", dim=8)
    index.init_index(max_elements=100, M=8, ef_construction=50, random_seed=0)
    index.add_items(data, np.arange(50))
    with StateDir(tmp_path) as state:
        state.recover()
        state.checkpoint({"latents": data}, {"index.hnsw": lambda p: index.save_index(str(p))})
        state.checkpoint({"latents": data}, {"index.hnsw": lambda p: index.save_index(str(p))})
    # a crafted index in the newest checkpoint: refused, the previous one is used
    crafted = tmp_path / "checkpoints" / "000002" / "index.hnsw"
    raw = bytearray(crafted.read_bytes())
    raw[8:16] = (2**62).to_bytes(8, "little")  # absurd element count
    crafted.write_bytes(bytes(raw))
    with StateDir(tmp_path) as state:
        ck = state.recover().checkpoint
        assert ck.number == 1 and "index.hnsw" in ck.warnings[0]
        loaded = hnswlib.Index(space="cosine", dim=8)
        loaded.load_index(str(ck.files["index.hnsw"]), max_elements=100)
        loaded.set_ef(100)  # >= the element count: the search is exact
        labels, _ = loaded.knn_query(data, k=1, num_threads=1)
        assert labels[:, 0].tolist() == list(range(50))


def test_state_dir_is_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        with StateDir(tmp_path / "s") as state:
            state.recover()
            fill_with_checkpoints(state, 2)
    finally:
        os.umask(old)
    for p in [tmp_path / "s", *(tmp_path / "s").rglob("*")]:
        assert p.stat().st_mode & 0o777 == (0o700 if p.is_dir() else 0o600), p
