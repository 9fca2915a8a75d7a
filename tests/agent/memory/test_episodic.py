"""EpisodicMemory: recall against exact kNN, state round trip, validation, threads, API."""

import threading

import numpy as np
import pytest

from agent.errors import ConfigError, StateError
from agent.memory import EpisodicMemory, MemoryConfig, MemoryInputError, MemoryStateError
from agent.memory.episodic import FREE_ID

DIM = 64
K = 4  # code_k in these tests


def codes_for(rng, n, m=64):
    return np.sort(np.array([rng.choice(m, K, replace=False) for _ in range(n)]), axis=1)


def fill(mem, X, labels, rng, ts0=0.0):
    codes = codes_for(rng, len(X))
    return [mem.add(x, c, int(y), surprise=float(rng.random()), ts=ts0 + i)
            for i, (x, c, y) in enumerate(zip(X, codes, labels, strict=True))]


def exact_knn(mem, Q, k):
    """Brute-force cosine kNN over what the memory holds: (ids (q, k), distances (q, k))."""
    st = mem.state_arrays()
    live = np.flatnonzero(st["valid"])
    L = st["latents"][live].astype(np.float64)
    L /= np.linalg.norm(L, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    D = 1.0 - Qn @ L.T
    order = np.argsort(D, axis=1, kind="stable")[:, :k]
    return st["episode_ids"][live][order], np.take_along_axis(D, order, axis=1)


def recall_at(mem, Q, k=10):
    want, _ = exact_knn(mem, Q, k)
    got = [mem.query(q, k)[0] for q in Q]
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(got, want, strict=True)]))


@pytest.fixture(scope="module")
def churned():
    """2,000-slot memory after 3,000 adds of random Gaussian latents (1,000 evictions)."""
    rng = np.random.default_rng(0)
    cfg = MemoryConfig(capacity=2000, dim=DIM, code_k=K, ef_search=100, latent_dtype="float32")
    mem = EpisodicMemory(cfg)
    X = rng.standard_normal((3000, DIM)).astype(np.float32)
    fill(mem, X, rng.integers(0, 5, 3000), rng)
    return mem, rng.standard_normal((200, DIM)).astype(np.float32)


def test_recall_at_10_vs_exact_after_evictions(churned):
    mem, Q = churned
    assert len(mem) == 2000
    r = recall_at(mem, Q)
    print(f"recall@10 = {r:.3f} (2,000 x {DIM}, 1,000 replaced nodes, ef_search=100)")
    assert r >= 0.95


def test_default_ef_search_recall_on_latent_like_data():
    """Encoder latents have low intrinsic dimension; the default config must reach 0.95 there."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal((12, DIM)).astype(np.float32)
    centres = rng.standard_normal((20, DIM)).astype(np.float32)
    z = rng.standard_normal((5200, 12)).astype(np.float32)
    X = np.maximum(z @ A + centres[rng.integers(0, 20, 5200)], 0) + 0.05 * rng.standard_normal((5200, DIM))
    X = X.astype(np.float32)
    mem = EpisodicMemory(MemoryConfig(capacity=5000, dim=DIM))
    code = np.arange(mem.config.code_k)
    for i, x in enumerate(X[200:]):
        mem.add(x, code, i % 20, ts=float(i))
    r = recall_at(mem, X[:200])
    print(f"recall@10 = {r:.3f} (5,000 latent-like x {DIM}, default ef_search={mem.config.ef_search})")
    assert r >= 0.95


def test_distances_are_cosine_and_sorted(churned):
    mem, Q = churned
    want_ids, want_d = exact_knn(mem, Q[:20], 10)
    for q, wi, wd in zip(Q[:20], want_ids, want_d, strict=True):
        ids, d = mem.query(q, 10)
        assert ids.dtype == np.uint64 and d.dtype == np.float32 and (np.diff(d) >= 0).all()
        lat = mem.get(ids).latents.astype(np.float64)
        cos = 1 - lat @ q / (np.linalg.norm(lat, axis=1) * np.linalg.norm(q))
        np.testing.assert_allclose(d, cos, atol=1e-5)
        assert (d >= wd - 1e-5).all()   # the i-th found is never nearer than the i-th exact
        assert np.intersect1d(ids, wi).size >= 8


def test_state_round_trip_gives_identical_queries(churned, tmp_path):
    mem, Q = churned
    arrays = mem.checkpoint(tmp_path / "index.bin")
    again = EpisodicMemory.from_state(mem.config, arrays, tmp_path / "index.bin")
    assert len(again) == len(mem)
    np.testing.assert_array_equal(again.class_counts(), mem.class_counts())
    np.testing.assert_array_equal(again.ids(), mem.ids())
    for q in Q[:50]:
        a, b = mem.query(q, 10), again.query(q, 10)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    for name, arr in again.state_arrays().items():
        np.testing.assert_array_equal(arr, arrays[name], err_msg=name)
    # The restored memory keeps working: evicts and ids keep increasing.
    before = again.ids().max()
    eid = again.add(Q[0], [0, 1, 2, 3], 1, 0.0, 1e6)
    assert eid > before and len(again) == 2000 and again.query(Q[0], 1)[0][0] == eid


def test_rebuild_without_index_file(churned):
    mem, Q = churned
    again = EpisodicMemory.from_state(mem.config, mem.state_arrays())
    assert recall_at(again, Q[:100]) >= 0.95


def test_from_state_is_loud(churned, tmp_path):
    mem, _ = churned
    arrays = mem.checkpoint(tmp_path / "index.bin")
    cases = [
        ({**arrays, "labels": arrays["labels"].astype(np.int64)}, r"'labels' has shape \(2000,\) dtype int64"),
        ({**arrays, "latents": arrays["latents"][:, :32]}, r"'latents' has shape \(2000, 32\)"),
        ({k: v for k, v in arrays.items() if k != "strength"}, r"missing fields \['strength'\]"),
        ({**arrays, "extra": np.zeros(1)}, r"unknown fields \['extra'\]"),
    ]
    for bad, match in cases:
        with pytest.raises(MemoryStateError, match=match) as exc:
            EpisodicMemory.from_state(mem.config, bad, tmp_path / "index.bin")
        assert isinstance(exc.value, StateError)
    nan = {**arrays, "latents": arrays["latents"].copy()}
    nan["latents"][np.flatnonzero(arrays["valid"])[3], 0] = np.nan
    with pytest.raises(MemoryStateError, match="'latents': slot .* not finite"):
        EpisodicMemory.from_state(mem.config, nan)
    moved = {**arrays, "episode_ids": arrays["episode_ids"].copy()}
    moved["episode_ids"][np.flatnonzero(arrays["valid"])[0]] += 1
    with pytest.raises(MemoryStateError, match="does not map to its slot"):
        EpisodicMemory.from_state(mem.config, moved)
    # Arrays from one memory, index from another.
    other = EpisodicMemory(mem.config)
    other.add(np.ones(DIM, np.float32), [0, 1, 2, 3], 0)
    other.save_index(tmp_path / "other.bin")
    with pytest.raises(MemoryStateError, match="does not match the arrays"):
        EpisodicMemory.from_state(mem.config, arrays, tmp_path / "other.bin")


def make(capacity=50, **kw):
    return EpisodicMemory(MemoryConfig(capacity=capacity, dim=8, code_k=K, **kw))


def vec(*head):
    v = np.zeros(8, np.float32)
    v[: len(head)] = head
    return v


def test_add_query_get_and_counts():
    mem = make()
    a = mem.add(vec(1, 0), [1, 2, 3, 4], label=0, surprise=0.5, ts=10.0)
    b = mem.add(vec(0, 1), [4, 3, 2, 1], label=2, surprise=0.0, ts=11.0)   # unsorted code is sorted
    assert b > a and len(mem) == 2
    ids, d = mem.query(vec(1, 0.1), k=5)
    assert ids.tolist() == [a, b] and d[0] < d[1]
    ep = mem.get([b, a])
    assert ep.ids.tolist() == [b, a] and ep.labels.tolist() == [2, 0]
    assert ep.codes[0].tolist() == [1, 2, 3, 4] and ep.strength.tolist() == [1.0, 1.0]
    assert ep.created_ts.tolist() == [11.0, 10.0] and ep.latents.dtype == np.float16
    assert mem.class_counts().tolist() == [1, 0, 1]
    assert mem.ids().tolist() == [a, b]


def test_empty_memory():
    mem = make()
    ids, d = mem.query(vec(1), 10)
    assert ids.size == 0 and d.size == 0
    assert mem.knn_vote(vec(1), 10, 3).tolist() == [0, 0, 0]
    assert len(mem.sample_balanced(10, 0)) == 0
    assert mem.class_counts().size == 0 and len(mem) == 0


def test_knn_vote_weights_by_similarity():
    mem = make()
    mem.add(vec(1, 0), [0, 1, 2, 3], 0)
    mem.add(vec(1, 0.05), [0, 1, 2, 3], 0)
    mem.add(vec(0, 1), [0, 1, 2, 3], 1)
    mem.add(vec(-1, 0), [0, 1, 2, 3], 2)   # opposite: similarity clipped to 0
    scores = mem.knn_vote(vec(1, 0.2), k=4, n_classes=3)
    assert scores.shape == (3,) and abs(scores.sum() - 1) < 1e-9
    assert scores[0] > scores[1] > 0 and scores[2] == 0
    with pytest.raises(MemoryInputError, match="n_classes=2, but a neighbour has label 2"):
        mem.knn_vote(vec(-1, 0), k=4, n_classes=2)


def test_rerank_by_code_overlap():
    mem = make()
    near_wrong_code = mem.add(vec(1, 0), [0, 1, 2, 3], 0)
    far_right_code = mem.add(vec(1, 0.3), [10, 11, 12, 13], 1)
    assert mem.query(vec(1, 0), 1)[0].tolist() == [near_wrong_code]
    ids, d = mem.query(vec(1, 0), 1, code=[10, 11, 12, 40])
    assert ids.tolist() == [far_right_code] and d[0] > 0


def test_eviction_is_class_balanced_and_strength_ordered():
    mem = make(capacity=6)
    a = [mem.add(vec(1, i), [0, 1, 2, 3], 0, ts=float(i)) for i in range(4)]
    b = [mem.add(vec(i, 1), [0, 1, 2, 3], 1, ts=10.0 + i) for i in range(2)]
    mem.decay([a[2]], 0.5)                       # weakest episode of the biggest class
    c = mem.add(vec(0, 0, 1), [0, 1, 2, 3], 2, ts=20.0)
    assert a[2] not in mem.ids() and mem.class_counts().tolist() == [3, 2, 1]
    assert a[2] not in mem.query(vec(1, 2), 6)[0]
    with pytest.raises(MemoryInputError, match=f"episode ids \\[{a[2]}\\] are not stored"):
        mem.get([a[2]])
    mem.add(vec(0, 0, 1, 1), [0, 1, 2, 3], 2, ts=21.0)   # all equal retention: oldest of class 0
    assert a[0] not in mem.ids() and mem.class_counts().tolist() == [2, 2, 2]
    assert set(mem.ids().tolist()) == {a[1], a[3], *b, c, int(mem.ids().max())}


def test_remove_decay_touch_replay_skip_unknown_ids():
    mem = make()
    ids = [mem.add(vec(1, i), [0, 1, 2, 3], i % 2, ts=0.0) for i in range(4)]
    assert mem.remove([ids[0], ids[0], 10**9, FREE_ID]) == 1   # FREE_ID never names a free slot
    assert len(mem) == 3 and ids[0] not in mem.query(vec(1, 0), 4)[0]
    assert mem.decay([ids[1], ids[1], ids[0]], 0.5) == 1
    assert mem.get([ids[1]]).strength.tolist() == [0.5]
    assert mem.mark_replayed([ids[2], ids[2], ids[3]], ts=5.0) == 3
    ep = mem.get([ids[2], ids[3]])
    assert ep.replay_count.tolist() == [2, 1] and ep.last_access_ts.tolist() == [5.0, 5.0]
    assert mem.touch([ids[1]], ts=7.0) == 1 and mem.get(ids[1]).last_access_ts.tolist() == [7.0]
    # A removed slot is reused under a new, larger id.
    new = mem.add(vec(0, 0, 1), [0, 1, 2, 3], 0)
    assert new > max(ids) and new % 50 == ids[0] % 50
    assert mem.state_arrays()["episode_ids"][ids[0] % 50] == new


def test_sample_balanced():
    mem = make(capacity=100)
    rng = np.random.default_rng(0)
    for i in range(60):   # 50 of class 0, 10 of class 1
        mem.add(rng.standard_normal(8), [0, 1, 2, 3], int(i >= 50), surprise=float(i % 3), ts=float(i))
    ep = mem.sample_balanced(200, seed=3)
    assert len(ep) == 200 and np.bincount(ep.labels).tolist() == [100, 100]
    assert (ep.surprise > 0).all()                       # zero-surprise episodes not drawn
    uni = mem.sample_balanced(200, seed=3, weighting="uniform")
    assert (uni.surprise == 0).any()
    np.testing.assert_array_equal(mem.sample_balanced(50, seed=9).ids, mem.sample_balanced(50, seed=9).ids)
    with pytest.raises(MemoryInputError, match="weighting='loud'"):
        mem.sample_balanced(5, 0, weighting="loud")


BAD_ADDS = [
    (dict(latent=np.zeros(7)), r"latent has shape \(7,\), expected \(8,\)"),
    (dict(latent=np.zeros((1, 8))), r"latent has shape \(1, 8\), expected \(8,\)"),
    (dict(latent=vec(np.nan)), r"non-finite value \(nan at index \(0,\)\)"),
    (dict(latent=vec(0, np.inf)), "non-finite value"),
    (dict(latent=vec(1e5)), "beyond float16's range"),                 # float16 overflow
    (dict(latent=vec(1e30, 1e30)), r"norm 1\.4\d*e\+30, expected below 1e19"),  # hnswlib's float32
    (dict(latent=np.zeros(8)), "all zeros"),
    (dict(latent=np.array(["x"] * 8)), "dtype <U1, expected a real float array"),
    (dict(code=[1, 2, 3]), r"code has shape \(3,\), expected \(4,\)"),
    (dict(code=[1, 2, 2, 3]), "repeats unit id 2"),
    (dict(code=[-1, 2, 3, 4]), "unit id -1"),
    (dict(code=[0.5, 1, 2, 3]), "integer unit ids"),
    (dict(label=-1), "label=-1"),
    (dict(label=2**21), "label=2097152"),
    (dict(label=1.0), "expected an int"),
    (dict(surprise=-0.1), "surprise=-0.1"),
    (dict(surprise=float("nan")), "surprise=nan"),
    (dict(ts=float("inf")), "ts=inf"),
]


@pytest.mark.parametrize("override, match", BAD_ADDS)
def test_add_rejects_bad_input(override, match):
    mem = make()
    args = dict(latent=vec(1), code=[0, 1, 2, 3], label=0, surprise=0.0, ts=0.0) | override
    with pytest.raises(MemoryInputError, match=match):
        mem.add(**args)
    assert len(mem) == 0 and mem.ids().size == 0


def test_query_rejects_bad_input():
    mem = make()
    mem.add(vec(1), [0, 1, 2, 3], 0)
    with pytest.raises(MemoryInputError, match=r"expected \(8,\)"):
        mem.query(np.zeros(9, np.float32))
    with pytest.raises(MemoryInputError, match="non-finite"):
        mem.query(vec(np.nan))
    with pytest.raises(MemoryInputError, match="k=0"):
        mem.query(vec(1), 0)
    with pytest.raises(MemoryInputError, match=r"expected \(n,\) integers"):
        mem.get([[1]])
    with pytest.raises(MemoryInputError, match=r"dtype float64, expected \(n,\) integers"):
        mem.get([1.5])
    with pytest.raises(MemoryInputError, match="ids hold -1"):
        mem.remove([-1, 2])
    with pytest.raises(MemoryInputError, match="factor=2.0"):
        mem.decay([0], 2.0)


@pytest.mark.parametrize("kwargs", [dict(capacity=0), dict(dim=0), dict(space="l2"),
                                    dict(latent_dtype="float64"), dict(half_life_s=0.0),
                                    dict(ef_search=0), dict(replay_weight=-1.0)])
def test_config_validated(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        MemoryConfig(**kwargs)


def test_exact_fallback_when_hnswlib_cannot_fill_k():
    # A sparse graph (M=2) leaves nodes unreachable from the entry point: the real hnswlib
    # then raises RuntimeError for k = every episode, and the memory answers exactly.
    mem = make(M=2, ef_construction=2, ef_search=1)
    rng = np.random.default_rng(0)
    fill(mem, rng.standard_normal((50, 8)).astype(np.float32), np.zeros(50, int), rng)
    q = rng.standard_normal((1, 8)).astype(np.float32)
    with pytest.raises(RuntimeError, match="contiguous 2D array"):
        mem._index.knn_query(q, k=50, num_threads=1)      # the case under test happens
    want_ids, want_d = exact_knn(mem, q, 50)
    ids, d = mem.query(q[0], 50)
    np.testing.assert_array_equal(ids, want_ids[0])
    np.testing.assert_allclose(d, want_d[0], atol=1e-3)   # latents stored as float16
    labels, dist = mem.neighbours(q, 50)
    np.testing.assert_allclose(dist[0], want_d[0], atol=1e-3)


def test_concurrent_adds_and_queries():
    mem = make(capacity=200)
    errors, stop = [], threading.Event()

    def reader():
        rng = np.random.default_rng(1)
        while not stop.is_set():
            try:
                ids, _ = mem.query(rng.standard_normal(8), 10)
                assert (ids != FREE_ID).all() and len(set(ids.tolist())) == len(ids)
                mem.knn_vote(rng.standard_normal(8), 5, n_classes=4)
                mem.sample_balanced(8, 0)
            except Exception as exc:   # report in the main thread
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(2)
    for i in range(500):
        mem.add(rng.standard_normal(8), [0, 1, 2, 3], i % 4, ts=float(i))
        if i % 50 == 0:
            mem.remove(mem.ids()[:3])
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(mem) <= 200 and mem.class_counts().sum() == len(mem)
