"""`agent` is the device runtime: it must never pull in torch, export or firmware_sim."""

import subprocess
import sys

AGENT_MODULES = """
import pkgutil, importlib, sys, agent
for m in pkgutil.walk_packages(agent.__path__, "agent."):
    importlib.import_module(m.name)
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'export', 'firmware_sim', 'onnx'))
print(','.join(bad))
"""

CLI = """
import sys, agent.cli
agent.cli.build_parser()  # plugins register their subcommands; nothing heavy may load
print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx'))))
"""


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_agent_never_imports_torch_export_or_sim():
    assert _run(AGENT_MODULES) == ""


def test_cli_parser_does_not_import_torch():
    assert _run(CLI) == ""


def test_plain_import_is_cheap():
    code = ("import sys, agent; print(len([m for m in sys.modules "
            "if m.startswith(('numpy', 'onnxruntime', 'paho', 'numba'))]))")
    assert _run(code) == "0"
