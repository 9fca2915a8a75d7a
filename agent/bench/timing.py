"""Per-call latency of several implementations measured side by side, in one run.

On a shared machine the load changes from one second to the next, so timing A for ten
seconds and then B for ten seconds compares two machines. `interleaved_times` alternates
short blocks of calls instead: every implementation sees the same stretch of machine
load. Blocks, not single calls: alternating call by call lets each implementation evict
the other's weights from the caches (measured here: the fp32 cnn1d encoder took 63 us
per window in a loop of its own and ~100 us when every call alternated with torch), which
no single-model device does. The first call of each block is untimed (re-warms the caches).

    times = interleaved_times({"fp32": f, "int8": g}, windows, iterations=2000)
    summary(times["int8"])   # {"p50_us": ..., "p99_us": ...}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

BLOCK = 50
WARMUP = 50


def interleaved_times(fns: Mapping[str, Callable[[np.ndarray], object]], xs: np.ndarray,
                      iterations: int, block: int = BLOCK, warmup: int = WARMUP
                      ) -> dict[str, list[float]]:
    """Seconds per call of each ``fns[name](x)``, ``iterations`` timed calls each.

    Rounds of one block per function, the order rotating each round; every function gets
    the same inputs in the same order (``xs`` cycled). ``warmup`` untimed calls each come
    first (allocations, kernel selection, lazy imports, JIT).
    """
    if iterations < 1 or block < 1:
        raise ValueError(f"iterations={iterations}, block={block}, expected >= 1")
    if len(xs) == 0:
        raise ValueError("no inputs to time")
    names = list(fns)
    for name in names:
        for i in range(warmup):
            fns[name](xs[i % len(xs)])
    out: dict[str, list[float]] = {n: [] for n in names}
    clock = time.perf_counter
    done, r = 0, 0
    while done < iterations:
        n = min(block, iterations - done)
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            fn, samples = fns[name], out[name]
            fn(xs[done % len(xs)])  # untimed: re-warm after the other functions ran
            for i in range(done, done + n):
                x = xs[i % len(xs)]
                t0 = clock()
                fn(x)
                samples.append(clock() - t0)
        done += n
        r += 1
    return out


def summary(samples_s: list[float]) -> dict[str, float]:
    """`agent.bench.cli.percentiles` (p50, p99 in microseconds), rounded to 0.1 us."""
    from agent.bench.cli import percentiles

    return {k: round(v, 1) for k, v in percentiles(samples_s).items()}
