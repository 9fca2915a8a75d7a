"""`make mutation`: mutation testing of agent/ with mutmut, one module at a time.

Each module runs in its own copy of the work tree (under .cache/mutation/, so other
edits to the tree never meet a mutant and a rerun is incremental) against only the tests
that cover it (`TESTS` below; mutmut then narrows each mutant to the tests that reach the
mutated function). Prints a table, writes .cache/mutation/report.json and, per module, the
diff of every surviving mutant (`survivors-<module>.txt`); docs/mutation.md says how to
read them.

    .venv/bin/python -m tests.mutation agent/protocol.py agent/scheduler.py
    make mutation MUTATE="agent/windowing.py"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".cache" / "mutation"
# module -> the tests that exercise it (fast suite only; broker tests are fine, slow ones not)
TESTS: dict[str, list[str]] = {
    "agent/protocol.py": ["tests/agent/test_protocol.py", "tests/agent/test_fuzz_decoders.py"],
    "agent/windowing.py": ["tests/agent/test_windowing.py"],
    "agent/persist/wal_format.py": ["tests/agent/persist/test_wal_format.py",
                                    "tests/agent/persist/test_wal.py"],
    "agent/scheduler.py": ["tests/agent/test_scheduler.py"],
    "agent/messages.py": ["tests/agent/test_messages.py", "tests/agent/test_fuzz_decoders.py"],
    "agent/outbox.py": ["tests/agent/test_outbox.py"],
    "agent/history.py": ["tests/agent/test_history.py"],
    "agent/topics.py": ["tests/agent/test_topics_and_urls.py"],
}
DEFAULT = ["agent/protocol.py", "agent/windowing.py", "agent/persist/wal_format.py",
           "agent/scheduler.py"]
COPY = ("agent/", "export/", "firmware_sim/", "tests/")


def _copy_tree(dest: Path) -> None:
    """The packages and tests as they are in the work tree now (tracked and new files)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                         check=True, capture_output=True).stdout
    for rel in out.decode().split("\0"):
        src = REPO / rel
        if not rel.startswith(COPY) or not src.is_file():
            continue
        target = dest / rel
        if not target.exists() or target.read_bytes() != src.read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def _toml_list(items: list[str]) -> str:
    return json.dumps(items)


def _configure(dest: Path, module: str, tests: list[str]) -> None:
    """The project's [tool.mutmut] with this module and its tests filled in."""
    text = (REPO / "pyproject.toml").read_text()
    base = tomllib.loads(text)["tool"]["mutmut"]
    start = text.index("[tool.mutmut]")
    nxt = text.find("\n[", start + 1)
    rest = text[:start] + (text[nxt + 1:] if nxt != -1 else "")
    conf = {**base, "only_mutate": [module], "pytest_add_cli_args_test_selection": tests}
    lines = ["[tool.mutmut]"]
    for key, value in conf.items():
        lines.append(f"{key} = {_toml_list(value) if isinstance(value, list) else json.dumps(value)}")
    (dest / "pyproject.toml").write_text(rest.rstrip() + "\n\n" + "\n".join(lines) + "\n")


def run_module(module: str, max_children: int) -> dict:
    from mutmut.stats import status_by_exit_code

    tests = TESTS.get(module)
    if tests is None:
        raise SystemExit(f"{module}: no tests mapped in tests/mutation.py TESTS")
    dest = WORK / module.replace("/", "_").removesuffix(".py")
    dest.mkdir(parents=True, exist_ok=True)
    _copy_tree(dest)
    _configure(dest, module, tests)
    env = dict(os.environ, HNSWLIB_NO_NATIVE="1",
               NUMBA_CACHE_DIR=os.environ.get("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba")))
    env.pop("PYTHONPATH", None)
    mutmut = Path(sys.executable).with_name("mutmut")
    t0 = time.monotonic()
    run = subprocess.run([str(mutmut), "run", "--max-children", str(max_children)], cwd=dest,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - t0
    meta = dest / "mutants" / (module + ".meta")
    if run.returncode != 0 or not meta.exists():
        raise SystemExit(f"mutmut failed on {module} (exit {run.returncode}):\n"
                         f"{run.stderr[-3000:]}")
    data = json.loads(meta.read_text())
    codes = data["exit_code_by_key"]
    counts: dict[str, int] = {}
    for code in codes.values():
        status = status_by_exit_code[code].replace(" ", "_")
        counts[status] = counts.get(status, 0) + 1
    survivors = sorted(k for k, c in codes.items() if status_by_exit_code[c] == "survived")
    diffs = []
    for name in survivors:
        show = subprocess.run([str(mutmut), "show", name], cwd=dest, env=env,
                              capture_output=True, text=True)
        diffs.append(show.stdout.strip())
    name = module.replace("/", "_").removesuffix(".py")
    (WORK / f"survivors-{name}.txt").write_text("\n\n".join(diffs) + "\n")
    test_s = sum(data.get("durations_by_key", {}).values())   # seconds spent in tests
    return {"module": module, "tests": tests, "mutants": len(codes), **counts,
            "survived": len(survivors), "wall_s": round(wall, 1),
            "test_s_per_mutant": round(test_s / max(1, len(codes)), 3),
            "survivors": survivors}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", default=None, help=f"default: {' '.join(DEFAULT)}")
    p.add_argument("--max-children", type=int, default=2)
    args = p.parse_args(argv)
    rows = [run_module(m, args.max_children) for m in (args.modules or DEFAULT)]
    print(f"{'module':32} {'mutants':>7} {'killed':>6} {'survived':>8} {'timeout':>7} "
          f"{'no tests':>8} {'s/mutant':>8} {'wall s':>7}")   # s/mutant: test time
    for r in rows:
        print(f"{r['module']:32} {r['mutants']:7} {r.get('killed', 0):6} {r['survived']:8} "
              f"{r.get('timeout', 0):7} {r.get('no_tests', 0):8} {r['test_s_per_mutant']:8} "
              f"{r['wall_s']:7}")
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "report.json").write_text(json.dumps(rows, indent=1))
    print(f"survivors: {WORK}/survivors-*.txt; table: {WORK}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
