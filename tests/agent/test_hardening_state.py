"""Issue 13, findings 2 (persistence half), 8, 10, 11 and 12: what the daemon writes and
what it accepts at start-up.

* a checkpoint that would exceed its size limit (or whose meta.json a load would refuse)
  is not written, and the previous one stays current;
* the window history is appended to a log and compacted, not rewritten every 10 s;
* bundle files are read and hashed once: sessions and arrays come from those bytes, so a
  file swapped after start-up is never used;
* anti-rollback: a bundle older than the newest this state directory ran is refused,
  unless explicitly allowed; start-up warns about every insecure default;
* the state root is 0700, temp names are unique per write, and the default client id
  carries a random per-install suffix.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import threading

import numpy as np
import pytest

from agent import startup
from agent.bundle import load_bundle, write_manifest
from agent.config import BrokerConfig
from agent.daemon import Daemon
from agent.errors import BundleError, StateError
from agent.head import Head
from agent.history import WindowHistory
from agent.history_store import HistoryStore
from agent.inference import Encoder
from agent.mqtt import BrokerURL
from agent.persist import CheckpointStore
from agent.persist.fsio import replace_atomically
from tests.agent.test_daemon import agent_config


def _close(d: Daemon) -> None:
    """A daemon that was built but never started: release its state directory."""
    if d.pool is not None:
        d.pool.close()
    if d.history_store is not None:
        d.history_store.close()


# -- checkpoint size limits -------------------------------------------------------------
def test_a_checkpoint_over_its_size_limit_is_refused_and_the_previous_stays_current(tmp_path):
    store = CheckpointStore(tmp_path, max_bytes=64 * 1024)
    first = store.write({"a": np.zeros(100, np.float32)}, info={"n": 1})
    with pytest.raises(StateError, match="max_bytes=65536.*previous checkpoint is still current"):
        store.write({"a": np.zeros(100_000, np.float32)}, info={"n": 2})
    with pytest.raises(StateError, match="max_bytes=65536"):   # found only once written
        store.write({"a": np.zeros(100, np.float32)},
                    files={"big.bin": lambda p: p.write_bytes(b"x" * 100_000)}, info={"n": 3})
    ck = store.load()
    assert ck.number == first == store.current() and ck.info == {"n": 1}
    assert not [p for p in store.checkpoints_dir.iterdir() if p.name.startswith(".tmp-")]


def test_a_meta_json_a_load_would_refuse_is_never_written(tmp_path):
    store = CheckpointStore(tmp_path, max_bytes=1 << 30)
    first = store.write({"a": np.zeros(4, np.float32)}, info={"keys": []})
    bomb = {"keys": ["\U0001F600" * 128] * 12_000}      # ~18 MiB escaped, as in the audit
    with pytest.raises(StateError, match="meta.json would be .* more than the 16777216"):
        store.write({"a": np.zeros(4, np.float32)}, info=bomb)
    assert store.load().number == first


# -- incremental window history --------------------------------------------------------
def _history(store, n_windows, device="d", start=0, dim=4):
    h = store.load(capacity=64, dim=dim)
    h.journal = []
    ids = np.arange(start, start + n_windows)
    h.add(device, ids, ids.astype(np.float64), np.tile(ids[:, None], (1, dim)).astype("f4"))
    return h


def test_the_window_history_is_appended_not_rewritten_and_compacted_on_a_clean_stop(tmp_path):
    store = HistoryStore(tmp_path, "b1")
    h = _history(store, 10)
    store.mark_open()
    store.hand_off(h)
    store.write()
    assert not (tmp_path / "windows.npz").exists()     # no rewrite of every ring
    h.add("d", np.array([10]), np.array([10.0]), np.full((1, 4), 10, "f4"))
    store.hand_off(h)
    store.write()
    store.close()
    # a crash now: the log is replayed on top of (no) snapshot, and the stop was unclean
    again = HistoryStore(tmp_path, "b1")
    h2 = again.load(64, 4)
    assert h2.by_ids("d", range(11))[0].tolist() == list(range(11)) and not h2.clean
    # a clean stop writes the snapshot and empties the log
    h2.journal = []
    again.hand_off(h2, clean=True, force_snapshot=True)
    again.write()
    again.close()
    assert (tmp_path / "windows.npz").exists()
    third = HistoryStore(tmp_path, "b1")
    h3 = third.load(64, 4)
    assert h3.clean and h3.by_ids("d", [0, 10])[0].tolist() == [0, 10]
    third.close()


def test_the_history_log_is_compacted_once_it_outgrows_the_snapshot(tmp_path, monkeypatch):
    import agent.history_store as hs

    monkeypatch.setattr(hs, "MIN_COMPACT_BYTES", 1000)
    store = HistoryStore(tmp_path, "b1")
    h = _history(store, 0)
    for k in range(40):
        h.add("d", np.array([k]), np.array([float(k)]), np.full((1, 4), k, "f4"))
        store.hand_off(h)
        store.write()
    assert (tmp_path / "windows.npz").exists()
    assert store.log_bytes < 1000 + 400          # trimmed at least once
    store.close()
    h2 = HistoryStore(tmp_path, "b1").load(64, 4)
    assert h2.by_ids("d", range(40))[0].tolist() == list(range(40))


# -- bundle bytes: hashed once, used from memory --------------------------------------
def test_bundle_files_swapped_after_loading_are_never_used(base_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(base_bundle, copy)
    bundle = load_bundle(copy)
    x = np.random.default_rng(0).standard_normal((2, *bundle.input.shape)).astype("f4")
    want = Encoder(bundle).encode(x)
    head = Head.from_bundle(bundle)
    other = np.load(copy / "head.npz")
    swapped = {k: (other[k] * 0 + 7).astype(other[k].dtype) for k in other.files}
    with open(copy / "head.npz", "wb") as f:
        np.savez(f, **swapped)
    (copy / "encoder.onnx").write_bytes(b"not a model")
    np.testing.assert_array_equal(Encoder(bundle).encode(x), want)
    np.testing.assert_array_equal(Head.from_bundle(bundle).weights[0], head.weights[0])
    with pytest.raises(BundleError):              # a new load sees the swap
        load_bundle(copy)


# -- anti-rollback and insecure defaults -------------------------------------------------
def _dated(base_bundle, root, name, created):
    path = root / name
    shutil.copytree(base_bundle, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["created"] = created
    write_manifest(path, manifest)
    return path


def test_an_older_bundle_is_refused_on_a_state_that_ran_a_newer_one(base_bundle, broker_url,
                                                                    tmp_path, unique_device):
    old = _dated(base_bundle, tmp_path, "old", "2020-01-01T00:00:00+00:00")
    new = _dated(base_bundle, tmp_path, "new", "2030-01-01T00:00:00+00:00")
    state = tmp_path / "state"
    _close(Daemon(agent_config(new, broker_url, unique_device, state_dir=state)))
    with pytest.raises(BundleError, match="refusing a rollback.*agent.allow_bundle_rollback"):
        Daemon(agent_config(old, broker_url, unique_device, state_dir=state))
    _close(Daemon(agent_config(old, broker_url, unique_device, state_dir=state,
                               allow_bundle_rollback=True)))
    # the mark stays at the newest: the old bundle is still refused without the override
    with pytest.raises(BundleError, match="refusing a rollback"):
        Daemon(agent_config(old, broker_url, unique_device, state_dir=state))
    _close(Daemon(agent_config(old, broker_url, unique_device, state_dir=tmp_path / "fresh")))


def test_every_insecure_default_is_named_at_start_up(base_bundle, tmp_path, caplog,
                                                     unique_device):
    broker = BrokerConfig(url=BrokerURL.parse("mqtt://10.1.2.3:1883"))
    with caplog.at_level(logging.WARNING, logger="reverie.daemon"):
        _close(Daemon(agent_config(base_bundle, "", unique_device, broker=broker)))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("insecure:")]
    text = "\n".join(lines)
    assert "not signature-checked" in text and 'commands.from = "any"' in text
    assert "not encrypted" in text and "no password" in text, text
    caplog.clear()
    key = tmp_path / "k"
    key.write_bytes(b"k" * 32)
    with caplog.at_level(logging.WARNING, logger="reverie.daemon"):
        _close(Daemon(agent_config(base_bundle, "mqtt://127.0.0.1:1", unique_device,
                                   commands_key_file=key, state_dir=tmp_path / "s")))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert 'commands.from = "any"' not in text and "not encrypted" not in text


# -- state root, temp names, client id ---------------------------------------------------
def test_the_state_root_is_owner_only_and_the_client_id_is_per_install(base_bundle, broker_url,
                                                                       tmp_path, unique_device):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    d = Daemon(agent_config(base_bundle, broker_url, unique_device, state_dir=state))
    _close(d)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    suffix = (state / "install_id").read_text().strip()
    assert d.client_id == f"reverie-{unique_device}-{suffix}" and len(suffix) == 8
    d2 = Daemon(agent_config(base_bundle, broker_url, unique_device, state_dir=state))
    _close(d2)
    assert d2.client_id == d.client_id
    other = Daemon(agent_config(base_bundle, broker_url, unique_device,
                                state_dir=tmp_path / "other"))
    _close(other)
    assert other.client_id != d.client_id
    named = Daemon(agent_config(base_bundle, broker_url, unique_device, state_dir=state,
                                client_id="mine"))
    _close(named)
    assert named.client_id == "mine"
    nested = tmp_path / "a" / "b" / "state"
    startup.prepare_state_root(nested)
    assert stat.S_IMODE(nested.stat().st_mode) == 0o700


def test_concurrent_atomic_replacements_of_one_file_never_collide(tmp_path):
    path = tmp_path / "windows.npz"
    contents = [bytes([i]) * (1000 * (i + 1)) for i in range(2)]
    errors = []

    def writer(i):
        try:
            for _ in range(200):
                replace_atomically(path, contents[i])
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert path.read_bytes() in contents
    assert [p.name for p in tmp_path.iterdir()] == ["windows.npz"]


def test_history_snapshot_survives_the_old_format(tmp_path):
    """A windows.npz written before the history log (no wal_seq) still loads."""
    h = WindowHistory(8, 2)
    h.add("d", np.array([1, 2]), np.array([1.0, 2.0]), np.ones((2, 2), "f4"))
    arrays = h.snapshot("b1", clean=True)
    from agent.history import write_snapshot

    write_snapshot(tmp_path / "windows.npz", arrays)
    store = HistoryStore(tmp_path, "b1")
    loaded = store.load(8, 2)
    assert loaded.clean and loaded.by_ids("d", [1, 2])[0].tolist() == [1, 2]
    store.close()


def test_a_read_only_numba_cache_is_used_through_a_private_copy(tmp_path, monkeypatch):
    """The install-time kernel cache is read-only for the service user (a write there would
    be code execution at the next start); numba only uses a writable cache, so the daemon
    works on a private copy that dies with the process."""
    import numba.core.config as numba_config

    from agent import numba_cache

    pristine = tmp_path / "numba-cache"
    (pristine / "mod").mkdir(parents=True)
    (pristine / "mod" / "k.nbi").write_bytes(b"index")
    monkeypatch.setattr(numba_cache, "_done", False)
    monkeypatch.setattr(numba_config, "CACHE_DIR", numba_config.CACHE_DIR)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(pristine)
                        else real_access(p, mode))
    env = {"NUMBA_CACHE_DIR": str(pristine)}
    used = numba_cache.use_private_copy_if_read_only(env)
    assert used != str(pristine) and env["NUMBA_CACHE_DIR"] == used == numba_config.CACHE_DIR
    assert (tmp_path / used / "mod" / "k.nbi").read_bytes() == b"index"
    assert stat.S_IMODE(os.stat(used).st_mode) == 0o700
    # a writable cache (development, tests) is used as it is
    monkeypatch.setattr(numba_cache, "_done", False)
    assert numba_cache.use_private_copy_if_read_only({"NUMBA_CACHE_DIR": str(tmp_path)}) \
        == str(tmp_path)
