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
import traceback
from importlib.metadata import entry_points
from pathlib import Path

# Before numpy loads OpenBLAS: one BLAS thread. On a 2-4 core device the daemon's small
# matmuls (a batch of latents x the head) ran 3-4x slower with a thread pool fighting the
# worker, the network thread and onnxruntime for the cores (bench e2e profile).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from agent import __version__  # noqa: E402 - after the BLAS thread setting
from agent.errors import ReverieError  # noqa: E402

ENTRY_POINT_GROUP = "reverie.commands"
DEBUG_ENV = "REVERIE_DEBUG"


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
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error [{DEBUG_ENV}=1]")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from agent import daemon_cli
    from agent.bench import cli as bench_cli

    daemon_cli.register(sub)
    bench_cli.register(sub)
    _register_plugins(sub)
    return parser


def debug_enabled(args: argparse.Namespace | None = None) -> bool:
    """``--debug`` or ``REVERIE_DEBUG=1``: errors show their traceback."""
    flag = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    return flag or bool(getattr(args, "debug", False))


def error_line(command: str, exc: BaseException) -> str:
    """The one line a user error prints: what went wrong, naming the value (the
    exception's message says what was expected)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        what = f"{exc.filename}: {exc.strerror or exc}"
        parent = Path(str(exc.filename)).parent
        if isinstance(exc, FileNotFoundError) and not parent.is_dir():
            what += f" (the directory {parent} does not exist: create it first)"
    else:
        what = str(exc).strip() or type(exc).__name__
    what = " ".join(what.split())          # one line, whatever the message held
    return f"reverie {command}: error: {what}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ReverieError, OSError) as exc:
        # Expected failures (a bad value, a missing or unreadable file, a broker away) get
        # one line; --debug shows where it came from.
        if debug_enabled(args):
            traceback.print_exc()
        print(error_line(args.command, exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
