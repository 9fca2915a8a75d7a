"""The markdown summary of a ``reverie bench cl`` command: one table per dataset over its
seeds, then the issue's targets per seed (the text that leads docs/benchmarks.md's
continual-learning section).

Rows: every method, reverie's readouts (ACC only), the joint upper bound and the joint
references. Columns: ACC per seed and their mean, base-class forgetting per seed,
novelty AUROC / flag rate / false-alarm rate (means over seeds of each run's mean over
tasks), learn time per window (p50, mean over seeds).

The CLI writes it with ``--markdown``; ``python -m export.bench_cl.report A.json
[B.json ...]`` prints it again from the JSON of one or more commands (their runs merged,
the first command's line and environment).
"""

from __future__ import annotations

import numpy as np


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}"


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _seconds(run: dict) -> str:
    return f"{run['wall_time_s']:.0f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def group_runs(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs by dataset path, in the order the datasets were given."""
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(r["dataset"]["path"], []).append(r)
    return out


def dataset_table(runs: list[dict]) -> list[str]:
    """The markdown lines of one dataset's table and targets (``runs``: its seeds)."""
    seeds = [r["protocol"]["seed"] for r in runs]
    first = runs[0]
    proto, ds = first["protocol"], first["dataset"]
    s_cols = [f"s{s}" for s in seeds]
    header = (["method"] + [f"ACC % {c}" for c in s_cols] + ["ACC % mean"]
              + [f"base forget pts {c}" for c in s_cols]
              + ["novelty AUROC", "flag %", "false alarm %", "us/window p50"])
    lines = [f"### {ds['name']}", "",
             f"{len(ds['classes'])} classes, input {tuple(ds['input_shape'])}, "
             f"{ds['n_train']} train / {ds['n_test']} test windows; base "
             f"{len(proto['base_classes'])} classes, {proto['n_tasks']} tasks, memory "
             f"{proto['memory']}; seeds {', '.join(map(str, seeds))}; base bundle "
             f"{proto['base_bundle']['arch']} (latent {proto['base_bundle']['latent_dim']}); "
             f"wall time per run {', '.join(_seconds(r) for r in runs)} s.", "",
             _row(header), _row(["---"] * len(header))]
    blank = ["-"] * len(s_cols)

    def acc_cells(values: list[float | None]) -> list[str]:
        return [_pct(v) for v in values] + [_pct(_mean(values))]

    names = first["protocol"].get("methods") or list(first["methods"])   # JSON sorts keys
    for name in names:
        ms = [r["methods"].get(name) for r in runs]
        nov = [(m or {}).get("novelty") or {} for m in ms]
        lines.append(_row(
            [name] + acc_cells([m and m["acc"] for m in ms])
            + [_pct(m and m["base_forgetting"]) for m in ms]
            + [_num(_mean([n.get("auroc") for n in nov]), ".3f"),
               _pct(_mean([n.get("flag_rate") for n in nov])),
               _pct(_mean([n.get("false_alarm_rate") for n in nov])),
               _num(_mean([m and m["time_per_window_p50_us"] for m in ms]), ".0f")]))
        # reverie's readouts (the JSON also has reverie_no_sleep's)
        readouts = [(m or {}).get("readouts") or {} for m in ms] if name == "reverie" else []
        for ro in sorted({k for r in readouts for k in r}, key=lambda k: (k == "fused", k)):
            lines.append(_row([f"{name}: {ro} readout"] + acc_cells([r.get(ro) for r in readouts])
                              + blank + ["-"] * 4))
    joint = [r.get("joint_upper_bound") or {} for r in runs]
    lines.append(_row([f"joint upper bound ({proto['base_bundle']['arch']}, bundle recipe)"]
                      + acc_cells([j.get("acc") for j in joint]) + blank + ["-"] * 4))
    for ref in dict.fromkeys(k for r in runs for k in r.get("joint_references") or {}):
        vals = [((r.get("joint_references") or {}).get(ref) or {}).get("acc") for r in runs]
        lines.append(_row([f"{ref} (joint)"] + acc_cells(vals) + blank + ["-"] * 4))
    lines += ["", *targets_table(runs)]
    return lines


def targets_table(runs: list[dict]) -> list[str]:
    """The targets (rows) per seed (columns): met / NOT met with the measured values."""
    seeds = [r["protocol"]["seed"] for r in runs]
    order: dict[str, str] = {}
    for r in runs:
        for t in r.get("targets") or []:
            order.setdefault(t["key"], t["target"])
    if not order:
        return ["(no targets: reverie did not run)", ""]
    lines = [_row(["target"] + [f"seed {s}" for s in seeds]), _row(["---"] * (1 + len(seeds)))]
    for key, label in order.items():
        cells = []
        for r in runs:
            t = next((t for t in r.get("targets") or [] if t["key"] == key), None)
            if t is None:
                cells.append("not measured")
            else:
                verdict = {True: "met", False: "**NOT met**", None: "reported"}[t["met"]]
                cells.append(f"{verdict}: {t['measured']}")
        lines.append(_row([label, *cells]))
    return [*lines, ""]


def markdown(runs: list[dict], command: str | None = None, environment: dict | None = None
             ) -> str:
    """The whole summary: the command, then one section per dataset."""
    lines = ["## Continual learning: reverie against in-run baselines", ""]
    if command:
        lines += ["```", command, "```", ""]
    if environment:
        keys = ("python", "numpy", "onnxruntime", "torch", "sktime", "river", "cpus", "ts")
        lines += ["Environment: " + ", ".join(f"{k} {environment[k]}" for k in keys
                                              if environment.get(k) is not None) + ".", ""]
    lines += ["ACC = mean over tasks (base = task 0) of the final accuracies; base forget = "
              "the base classes' best accuracy before the last task minus their final one; "
              "novelty = before each new task is learned, its classes' test windows (novel) "
              "against every seen class's (known), mean over tasks, then over seeds; "
              "us/window = the learn call's p50 (latent and MiniRocket baselines exclude "
              "their batched feature transform).", ""]
    for runs_of_set in group_runs(runs).values():
        lines += dataset_table(runs_of_set)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    import json
    import sys

    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m export.bench_cl.report CL.json [CL2.json ...]", file=sys.stderr)
        return 2
    docs = [json.loads(open(p, encoding="utf-8").read()) for p in paths]
    runs = [r for d in docs for r in d["runs"]]
    commands = "\n".join(d.get("command") or "" for d in docs).strip()
    print(markdown(runs, commands or None, docs[0].get("environment")), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
