"""``reverie bench ...``: the benchmark group.

Benchmarks that need only the device runtime live in `agent.bench`; those that need torch
(``latency`` against torch eager, ``cl``, ``sleep``) live in `export` and register through
the ``reverie.bench`` entry-point group, so `agent` never imports them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

BENCH_GROUP = "reverie.bench"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (each writes JSON and prints a table)")
    bench_sub = p.add_subparsers(dest="bench", metavar="BENCH")
    bench_sub.required = True
    from agent.bench import chaos, e2e, fewshot, fuzz, memory, predict

    chaos.register(bench_sub)
    e2e.register(bench_sub)
    fuzz.register(bench_sub)
    fewshot.register(bench_sub)
    memory.register(bench_sub)
    predict.register(bench_sub)
    for ep in sorted(entry_points(group=BENCH_GROUP), key=lambda e: e.name):
        try:
            register_bench = ep.load()
        except ImportError as exc:
            q = bench_sub.add_parser(ep.name, help=f"(unavailable: {exc})")
            q.set_defaults(func=lambda _a, exc=exc, name=ep.name: _unavailable(name, exc))
            continue
        register_bench(bench_sub)


def _unavailable(name: str, exc: Exception) -> int:
    print(f"reverie bench {name}: unavailable here ({exc})", file=sys.stderr)
    return 2


def environment() -> dict:
    """What a benchmark figure depends on, recorded beside it."""
    import numpy as np

    info = {"python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or None, "numpy": np.__version__,
            "cpus": _cpu_count(), "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def percentiles(samples_s, qs=(50, 99)) -> dict[str, float]:
    """Percentiles of durations given in seconds, returned in microseconds."""
    import numpy as np

    arr = np.asarray(samples_s, dtype=np.float64) * 1e6
    return {f"p{q}_us": float(np.percentile(arr, q)) for q in qs}


def write_json(path: str | Path | None, result: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


def print_table(rows: list[dict], columns: list[str], title: str | None = None) -> None:
    """A plain fixed-width table on stdout."""
    if title:
        print(title)
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def command_line() -> str:
    """The command that produced a result, as ``reverie ...`` (for the JSON)."""
    argv = sys.argv[1:] if Path(sys.argv[0]).name in ("reverie", "cli.py", "__main__.py") \
        else sys.argv
    return " ".join(["reverie", *argv])


def say(tag: str, msg: str) -> None:
    """A progress line on stderr: ``[tag] msg``."""
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def flat(rows: list[dict]) -> list[dict]:
    """Rows with dict cells (drops by reason) written as ``reason=n ...`` for a table."""
    return [{k: (" ".join(f"{r}={n}" for r, n in v.items()) or "0") if isinstance(v, dict)
             else v for k, v in row.items()} for row in rows]


def print_verdicts(targets: list[dict]) -> None:
    """``met`` / ``NOT met`` / ``not measured`` per target (``met`` True/False/None)."""
    for t in targets:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"  {verdict:<12} {t['target']}: {t['value']}")
