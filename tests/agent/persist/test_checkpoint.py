"""CheckpointStore: round trip, verification before use, fallback, full disk, permissions."""

import json
import os

import numpy as np
import pytest

from agent.errors import StateError
from agent.persist import CheckpointStore
from agent.persist.checkpoint import encode_meta


def arrays(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "latents": rng.standard_normal((n, 8)).astype(np.float32),  # (N, D)
        "labels": rng.integers(0, 5, n).astype(np.int64),
        "strength": rng.random(n).astype(np.float16),
        "classes": np.array(["walk", "run", "idle"]),
        "empty": np.zeros((0, 3), np.float32),
    }


def write(store, n, seed=0, wal_seq=None):
    return store.write(arrays(n, seed), {"index.hnsw": lambda p: p.write_bytes(b"idx%d" % n)},
                       {"n": n, "note": "é"}, wal_seq=n if wal_seq is None else wal_seq)


def assert_matches(ck, n, seed=0):
    want = arrays(n, seed)
    assert set(ck.arrays) == set(want)
    for k, v in want.items():
        assert ck.arrays[k].dtype == v.dtype and ck.arrays[k].shape == v.shape
        np.testing.assert_array_equal(ck.arrays[k], v)
    assert ck.files["index.hnsw"].read_bytes() == b"idx%d" % n
    assert ck.info == {"n": n, "note": "é"} and ck.wal_seq == n


def test_empty_store_loads_none(tmp_path):
    assert CheckpointStore(tmp_path).load() is None


def test_round_trip_writer_and_copied_file(tmp_path):
    src = tmp_path / "outside.bin"
    src.write_bytes(b"\x00\x01" * 5000)
    store = CheckpointStore(tmp_path / "state")
    assert write(store, 5) == 1
    n = store.write({"x": np.arange(3)}, {"copy.bin": src, "w": lambda p: p.write_text("w")},
                    wal_seq=9)
    ck = store.load()
    assert ck.number == n == 2 and ck.warnings == () and ck.wal_seq == 9
    assert ck.files["copy.bin"].read_bytes() == src.read_bytes()
    assert (store.root / "CURRENT").read_text() == "000002\n"
    assert store.covered_seqs() == {1: 5, 2: 9}


def test_fortran_order_and_big_endian_arrays_survive(tmp_path):
    a = np.asfortranarray(np.arange(12, dtype=">f8").reshape(3, 4))
    store = CheckpointStore(tmp_path)
    store.write({"a": a})
    np.testing.assert_array_equal(store.load().arrays["a"], a)


def test_keeps_the_newest_n_and_deletes_older_only_after_the_switch(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    for i in range(1, 6):
        write(store, i)
    assert store.numbers() == [3, 4, 5]
    assert_matches(store.load(), 5)


DAMAGES = {
    "npy bit flip": lambda d: flip(d / "latents.npy", -3),
    "npy truncated": lambda d: os.truncate(d / "latents.npy", 100),
    "npy missing": lambda d: (d / "labels.npy").unlink(),
    "extra file tampered": lambda d: (d / "index.hnsw").write_bytes(b"idX4"),
    "meta digit flipped": lambda d: (d / "meta.json").write_bytes(
        (d / "meta.json").read_bytes().replace(b'"wal_seq": 4', b'"wal_seq": 7')),
    "meta not json": lambda d: (d / "meta.json").write_bytes(b"{not json"),
    "meta missing": lambda d: (d / "meta.json").unlink(),
    "dir missing": lambda d: [p.unlink() for p in d.iterdir()] and d.rmdir(),
}


def flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_falls_back_to_the_previous_with_a_warning(tmp_path, damage, caplog):
    store = CheckpointStore(tmp_path)
    write(store, 3)
    write(store, 4)
    DAMAGES[damage](store.path_of(2))
    ck = store.load()
    assert_matches(ck, 3)
    assert ck.number == 1 and len(ck.warnings) == 1
    assert "000002" in ck.warnings[0]
    assert "000002" in caplog.text  # logged too
    # the next write goes past the damaged one and becomes current
    assert write(store, 6) == 3
    assert_matches(store.load(), 6)


def test_a_tampered_extra_file_is_refused_before_the_caller_can_read_it(tmp_path):
    store = CheckpointStore(tmp_path)
    write(store, 3)
    write(store, 4)
    (store.path_of(2) / "index.hnsw").write_bytes(b"\xff" * 5)  # e.g. a crafted index
    ck = store.load()
    assert all(store.path_of(2) not in p.parents for p in ck.files.values())
    assert "index.hnsw sha256" in ck.warnings[0] or "index.hnsw has" in ck.warnings[0]
    (store.path_of(1) / "index.hnsw").write_bytes(b"idx3")  # same size, same bytes: fine
    os.truncate(store.path_of(1) / "index.hnsw", 2)
    with pytest.raises(StateError, match=r"no usable checkpoint.*000002.*000001"):
        store.load()


def test_current_garbage_falls_back_to_the_newest_on_disk(tmp_path):
    store = CheckpointStore(tmp_path)
    write(store, 3)
    write(store, 4)
    (tmp_path / "CURRENT").write_text("x1\n")
    ck = store.load()
    assert ck.number == 2 and "CURRENT" in ck.warnings[0]


def test_crash_before_the_first_switch_uses_the_complete_checkpoint_silently(tmp_path):
    store = CheckpointStore(tmp_path)
    write(store, 3)
    (tmp_path / "CURRENT").unlink()
    assert store.load().warnings == ()


def test_meta_path_traversal_is_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    write(store, 2)
    d = store.path_of(1)
    meta = json.loads((d / "meta.json").read_bytes())["meta"]
    meta["extra_files"] = ["../../CURRENT"]
    meta["files"]["../../CURRENT"] = {"sha256": "0" * 64, "bytes": 7}
    (d / "meta.json").write_bytes(encode_meta(meta))  # a self-consistent, hostile meta
    with pytest.raises(StateError, match="invalid"):
        store.load()


@pytest.mark.parametrize("bad", ["a/b", "../x", ".hidden", "", "meta.json", "x" * 200])
def test_invalid_names_are_refused(tmp_path, bad):
    store = CheckpointStore(tmp_path)
    with pytest.raises(StateError, match="name"):
        store.write({bad: np.zeros(1)})
    with pytest.raises(StateError, match="name"):
        store.write({}, {bad: lambda p: p.write_bytes(b"")})
    assert store.numbers() == []


def test_object_arrays_and_colliding_names_are_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(StateError, match="numeric"):
        store.write({"o": np.array([{}, None])})
    with pytest.raises(StateError, match="collides"):
        store.write({"x": np.zeros(1)}, {"x.npy": lambda p: p.write_bytes(b"")})
    with pytest.raises(StateError, match="JSON"):
        store.write({}, info={"bad": float("inf")})


def test_a_writer_that_creates_nothing_is_an_error_and_leaves_no_trace(tmp_path):
    store = CheckpointStore(tmp_path)
    write(store, 2)
    with pytest.raises(StateError, match="did not create"):
        store.write({}, {"idx": lambda p: None})
    assert store.numbers() == [1]
    assert not [p for p in store.checkpoints_dir.iterdir() if p.name.startswith(".")]


def count_writes(tmp_path, faulty_disk):
    store = CheckpointStore(tmp_path / "probe")
    write(store, 3)
    disk = faulty_disk()
    write(store, 4)
    return disk.calls


def test_disk_full_at_any_write_leaves_the_previous_checkpoint(tmp_path, faulty_disk, monkeypatch):
    n_writes = count_writes(tmp_path, faulty_disk)
    monkeypatch.undo()
    assert n_writes >= 7  # 5 arrays, meta, CURRENT (the writer callback uses write_bytes)
    for k in range(1, n_writes + 1):
        root = tmp_path / f"s{k}"
        store = CheckpointStore(root)
        write(store, 3)
        faulty_disk(fail_at=k)
        with pytest.raises(StateError, match="ENOSPC") as info:
            write(store, 4)
        monkeypatch.undo()
        assert str(root) in str(info.value)
        ck = store.load()
        assert ck.warnings == () and ck.number == 1, f"write #{k}"
        assert_matches(ck, 3)
        assert store.numbers() == [1]
        assert not [p for p in store.checkpoints_dir.iterdir() if p.name.startswith(".")]
        assert not [p for p in root.iterdir() if ".tmp-" in p.name]
        assert write(store, 5) == 2  # the disk has room again
        assert_matches(store.load(), 5)


def test_failed_fsync_at_any_point_leaves_a_loadable_state(tmp_path, faulty_disk, monkeypatch):
    for k in range(1, 12):
        store = CheckpointStore(tmp_path / f"s{k}")
        write(store, 3)
        disk = faulty_disk(fail_at=k, what=("fsync",))
        try:
            write(store, 4)
        except StateError:
            pass
        monkeypatch.undo()
        ck = store.load()
        assert ck.warnings == ()
        assert_matches(ck, 4 if ck.number == 2 else 3)
        if disk.calls < k:
            break


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_owner_only_permissions_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        store = CheckpointStore(tmp_path / "state")
        write(store, 2)
        write(store, 3)
    finally:
        os.umask(old)
    for p in [tmp_path / "state", *(tmp_path / "state").rglob("*")]:
        assert p.stat().st_mode & 0o777 == (0o700 if p.is_dir() else 0o600), p


def test_leftovers_of_an_interrupted_write_are_ignored_then_removed(tmp_path):
    store = CheckpointStore(tmp_path)
    write(store, 3)
    half = store.checkpoints_dir / ".tmp-000002-12345"
    half.mkdir()
    (half / "latents.npy").write_bytes(b"half")
    (tmp_path / ".CURRENT.tmp-12345").write_bytes(b"0000")
    assert store.load().number == 1 and store.load().warnings == ()
    assert write(store, 4) == 2
    assert not half.exists() and not (tmp_path / ".CURRENT.tmp-12345").exists()


def test_crash_between_rename_and_switch_keeps_the_old_current(tmp_path):
    store = CheckpointStore(tmp_path)
    write(store, 3)
    write(store, 4)
    (tmp_path / "CURRENT").write_text("000001\n")  # checkpoint 2 was renamed, not switched
    ck = store.load()
    assert ck.number == 1 and ck.warnings == ()
    assert write(store, 5) == 3
    assert store.load().number == 3
