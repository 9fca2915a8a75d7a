"""The accuracy-after-each-task plot (matplotlib, Agg canvas: no display needed)."""

from __future__ import annotations

from pathlib import Path


def _tick(i: int, protocol: dict) -> str:
    if i == 0:
        return f"base\n({len(protocol['base_classes'])} cl.)"
    names = protocol["tasks"][i - 1]
    shown = ",".join(names) if len(",".join(names)) <= 12 else f"{len(names)} cl."
    return f"{i}\n+{shown}"


def plot_curves(result: dict, path: str | Path) -> Path:
    """Per method, the mean accuracy over the tasks seen so far after each task, with the
    joint upper bound as a dashed line; written as PNG to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    protocol = result["protocol"]
    T = protocol["n_tasks"]
    fig = Figure(figsize=(8.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(T + 1))
    for name, m in result["methods"].items():
        style = {"linewidth": 2.5} if name == "reverie" else {"linewidth": 1.3}
        ax.plot(x, [100 * v for v in m["curve"]], marker="o", markersize=4, label=name,
                **style)
    joint = result.get("joint_upper_bound") or {}
    if joint.get("acc") is not None:
        ax.axhline(100 * joint["acc"], color="black", linestyle="--", linewidth=1,
                   label="joint upper bound")
    ax.set_xticks(x)
    ax.set_xticklabels([_tick(i, protocol) for i in x], fontsize=8)
    ax.set_xlabel("after task")
    ax.set_ylabel("mean accuracy over seen tasks (%)")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.set_title(f"class-incremental, {result['dataset']['name']}: memory {protocol['memory']},"
                 f" seed {protocol['seed']}", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
