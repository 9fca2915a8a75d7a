"""The ``reverie`` console script.

Subcommands that belong to the device runtime (``run``, ``health``) live in `agent`.
``export``, ``sim`` and ``demo`` are registered by their own packages through the
``reverie.commands`` entry-point group, so `agent` never imports torch or
`firmware_sim`; on a device installed without the ``train`` extra, ``reverie export``
says what to install instead of failing with an ImportError.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

# Before numpy loads OpenBLAS: one BLAS thread. On a 2-4 core device the daemon's small
# matmuls (a batch of latents x the head) ran 3-4x slower with a thread pool fighting the
# worker, the network thread and onnxruntime for the cores (bench e2e profile).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from agent import __version__  # noqa: E402 - after the BLAS thread setting
from agent.errors import ReverieError  # noqa: E402

ENTRY_POINT_GROUP = "reverie.commands"


def _register_plugins(sub: argparse._SubParsersAction) -> None:
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:  # e.g. a device without the `train` extra
            p = sub.add_parser(ep.name, help=f"(unavailable: {exc})")
            p.set_defaults(func=_unavailable(ep.name, exc))
            continue
        register(sub)


def _unavailable(name: str, exc: Exception):
    def run(args: argparse.Namespace) -> int:
        print(f"reverie {name}: unavailable here ({exc}); "
              "install the extra it needs, e.g. pip install 'reverie[train]'", file=sys.stderr)
        return 2
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reverie", description="Edge continual-learning agent over MQTT.")
    parser.add_argument("--version", action="version", version=f"reverie {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from agent import daemon_cli
    from agent.bench import cli as bench_cli

    daemon_cli.register(sub)
    bench_cli.register(sub)
    _register_plugins(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ReverieError as exc:
        # Expected failures get one line, no traceback.
        print(f"reverie {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
