"""Compile and cache every numba kernel of the runtime ahead of time.

Run at image build time (``python -m agent.warmup``) with ``NUMBA_CACHE_DIR`` pointing at
a directory the runtime user can write, so the first prediction on the device does not
pay seconds of JIT compilation. Modules listed in KERNEL_MODULES expose ``warmup()``,
which calls each kernel once on tiny inputs of every dtype signature the runtime uses.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

# Filled as the runtime grows numba kernels (sparse coding, memory, consolidation).
KERNEL_MODULES: list[str] = ["agent.memory.kernels", "agent.learner.kernels",
                             "agent.sleep.kernels"]


def main() -> int:
    cache = os.environ.get("NUMBA_CACHE_DIR")
    if not cache:
        print("warmup: NUMBA_CACHE_DIR is not set; compiled kernels would not persist",
              file=sys.stderr)
        return 2
    os.makedirs(cache, exist_ok=True)
    t0 = time.perf_counter()
    for name in KERNEL_MODULES:
        importlib.import_module(name).warmup()
    print(f"warmup: {len(KERNEL_MODULES)} kernel module(s) compiled into {cache} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
