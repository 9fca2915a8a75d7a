"""WindowHistory: per-device rings of recent window latents, and their persistence."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.history import WindowHistory


def _add(h, device, ids, dim=3):
    ids = np.asarray(ids, np.int64)
    h.add(device, ids, ids.astype(float) * 0.5, np.repeat(ids[:, None], dim, 1).astype("f4"))


def test_ring_keeps_the_newest_and_finds_by_id_and_time():
    h = WindowHistory(capacity=4, dim=3)
    _add(h, "a", range(6))                      # 0, 1 fall out
    found, lat, missing = h.by_ids("a", [1, 2, 5, 9])
    assert found.tolist() == [2, 5] and missing == [1, 9] and lat[:, 0].tolist() == [2, 5]
    ids, ts, _ = h.by_time("a", 1.0, 2.0)        # ts = id / 2
    assert ids.tolist() == [2, 3, 4] and ts.tolist() == [1.0, 1.5, 2.0]
    assert h.last_index("a") == 5 and h.last_index("b") == -1
    assert h.by_ids("b", [1])[2] == [1] and h.time_span("b") is None


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "dev-3"]),
                       st.lists(st.integers(0, 10_000), min_size=1, max_size=30, unique=True),
                       min_size=1), st.integers(1, 12), st.booleans())
def test_save_load_round_trip(tmp_path_factory, rings, capacity, clean):
    path = tmp_path_factory.mktemp("h") / "windows.npz"
    h = WindowHistory(capacity, dim=3)
    for device, ids in rings.items():
        _add(h, device, sorted(ids))
    h.save(path, "bundle-1", clean=clean)
    back = WindowHistory.load(path, "bundle-1", capacity, 3)
    assert back.clean is clean and not back.dirty
    for device, ids in rings.items():
        keep = sorted(ids)[-capacity:]
        found, lat, missing = back.by_ids(device, keep)
        assert found.tolist() == keep and not missing
        np.testing.assert_array_equal(lat[:, 0], np.asarray(keep, "f4"))
        assert back.last_index(device) == max(ids)


def test_another_bundle_or_a_corrupt_file_gives_an_empty_history(tmp_path):
    path = tmp_path / "windows.npz"
    h = WindowHistory(4, dim=3)
    _add(h, "a", [1, 2])
    h.save(path, "bundle-1", clean=True)
    assert len(WindowHistory.load(path, "bundle-2", 4, 3)) == 0       # other encoder
    assert len(WindowHistory.load(path, "bundle-1", 4, 5)) == 0       # other latent size
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data[: len(data) - 7]))
    assert len(WindowHistory.load(path, "bundle-1", 4, 3)) == 0       # damaged: ignored
    assert len(WindowHistory.load(tmp_path / "none.npz", "bundle-1", 4, 3)) == 0
