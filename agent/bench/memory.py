"""``reverie bench memory``: episodic-memory query and insert cost vs numpy brute force.

Fills an EpisodicMemory with ``--n`` latents, then times ``query(k)`` (hnswlib + the
wrapper's validation and id mapping) against an exact numpy search over the same latents
(normalised float32 matrix-vector product + argpartition: the obvious alternative),
measures recall@k against that exact search, the insert cost below and at capacity, and
the process RSS. Data: ``--latents FILE.npy`` (real encoder latents, repeated/jittered up
to n) or synthetic "latent-like" vectors (50 clusters of intrinsic dimension 12 behind a
ReLU, as an encoder's features are), never isotropic Gaussian noise, which no ANN index
is meant for.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np

from agent.bench.cli import environment, percentiles, print_table, write_json


def register(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("memory", help="episodic memory query/insert vs numpy brute force")
    p.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000],
                   help="episodes in memory (several sizes allowed)")
    p.add_argument("--dim", type=int, nargs="+", default=[64, 128],
                   help="latent dimensions to measure (default: 64 128)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default: 10)")
    p.add_argument("--queries", type=int, default=1000,
                   help="queries timed per configuration (default: 1000)")
    p.add_argument("--ef", type=int, default=None, help="hnswlib ef_search (default: config)")
    p.add_argument("--latents", default=None, help=".npy of real latents (N, dim) to draw from")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--json", default=None, help="write results here")
    p.set_defaults(func=cmd_memory)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def latent_like(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    A = rng.standard_normal((12, dim)).astype(np.float32)
    B = rng.standard_normal((50, dim)).astype(np.float32) * 0.8
    z = rng.standard_normal((n, 12)).astype(np.float32)
    c = rng.integers(0, 50, n)
    x = np.maximum(z @ A + B[c], 0) + 0.05 * rng.standard_normal((n, dim)).astype(np.float32)
    return x.astype(np.float32)


def _data(n: int, dim: int, path: str | None, rng) -> np.ndarray:
    if path is None:
        return latent_like(n, dim, rng)
    src = np.load(path, allow_pickle=False).astype(np.float32)
    if src.ndim != 2 or src.shape[1] != dim:
        raise SystemExit(f"--latents {path}: shape {src.shape}, expected (N, {dim})")
    idx = rng.integers(0, len(src), n)
    return src[idx] + 0.01 * src.std() * rng.standard_normal((n, dim)).astype(np.float32)


def run_one(n: int, dim: int, *, k: int, n_queries: int, ef: int | None, latents: str | None,
            seed: int) -> dict:
    from agent.memory import EpisodicMemory, MemoryConfig, kernels

    rng = np.random.default_rng(seed)
    kernels.warmup()
    X = _data(n + n_queries, dim, latents, rng)
    Q, X = X[:n_queries].copy(), X[n_queries:]
    cfg = MemoryConfig(capacity=n, dim=dim, latent_dtype="float16", seed=seed,
                       **({"ef_search": ef} if ef else {}))
    gc.collect()
    rss0 = rss_mb()
    mem = EpisodicMemory(cfg)
    code = np.arange(cfg.code_k, dtype=np.int32)
    labels = rng.integers(0, 50, n)
    add_t = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        mem.add(X[i], code, int(labels[i]), 0.5, float(i))
        add_t[i] = time.perf_counter() - t
    gc.collect()
    rss_mem = rss_mb() - rss0

    # The baseline: exact search in numpy over the same (float16-stored) latents.
    arrays = mem.state_arrays()
    L = arrays["latents"].astype(np.float32)
    L /= np.linalg.norm(L, axis=1, keepdims=True)
    ids_all = arrays["episode_ids"]

    def brute(q: np.ndarray) -> np.ndarray:
        s = L @ (q / np.linalg.norm(q))
        top = np.argpartition(-s, k)[:k]
        return top[np.argsort(-s[top])]

    for q in Q[:20]:  # warm caches and code paths for both
        brute(q)
        mem.query(q, k)
    bt, exact = [], []
    for q in Q:
        t = time.perf_counter()
        r = brute(q)
        bt.append(time.perf_counter() - t)
        exact.append(ids_all[r])
    qt, got = [], []
    for q in Q:
        t = time.perf_counter()
        ids, _ = mem.query(q, k)
        qt.append(time.perf_counter() - t)
        got.append(ids)
    recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(got, exact, strict=True)]))
    full_t = []
    for i in range(min(500, n_queries)):  # inserts at capacity: evict + replace_deleted
        t = time.perf_counter()
        mem.add(Q[i] + 0.01, code, int(labels[i]), 0.5, float(n + i))
        full_t.append(time.perf_counter() - t)
    q, b = percentiles(qt), percentiles(bt)
    return {
        "n": n, "dim": dim, "k": k, "ef_search": cfg.ef_search, "data": latents or "latent-like",
        "query_p50_us": q["p50_us"], "query_p99_us": q["p99_us"],
        "brute_p50_us": b["p50_us"], "brute_p99_us": b["p99_us"],
        "speedup_p50": b["p50_us"] / q["p50_us"], "recall_at_k": recall,
        "insert_p50_us": percentiles(add_t)["p50_us"], "insert_p99_us": percentiles(add_t)["p99_us"],
        "insert_full_p50_us": percentiles(full_t)["p50_us"],
        "insert_full_p99_us": percentiles(full_t)["p99_us"],
        "memory_rss_mb": rss_mem, "process_rss_mb": rss_mb(),
    }


def cmd_memory(args: argparse.Namespace) -> int:
    rows = []
    for dim in args.dim:
        for n in args.n:
            print(f"bench memory: n={n} dim={dim} ...", flush=True)
            rows.append(run_one(n, dim, k=args.k, n_queries=args.queries, ef=args.ef,
                                latents=args.latents, seed=args.seed))
    print_table(rows, ["n", "dim", "ef_search", "query_p50_us", "query_p99_us", "recall_at_k",
                       "brute_p50_us", "speedup_p50", "insert_p50_us", "insert_full_p50_us",
                       "memory_rss_mb"], title=f"episodic memory (k={args.k})")
    write_json(args.json, {"bench": "memory", "environment": environment(), "results": rows})
    return 0
