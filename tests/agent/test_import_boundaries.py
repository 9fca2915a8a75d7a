"""`agent` is the device runtime: it must never pull in torch, export or firmware_sim."""

import subprocess
import sys

CODE = """
import sys
import agent, agent.cli, agent.daemon, agent.daemon_cli, agent.protocol, agent.bundle
import agent.dataset, agent.inference, agent.windowing, agent.mqtt, agent.topics
agent.cli.build_parser()  # registering plugin subcommands must not import them heavily
bad = sorted(m for m in sys.modules
             if m.split('.')[0] in ('torch', 'export', 'firmware_sim', 'onnx')
             and not m.endswith('.cli') and m not in ('export', 'firmware_sim'))
print(','.join(bad))
"""


def test_agent_never_imports_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"agent imported: {out.stdout.strip()}"


def test_plain_import_is_cheap():
    code = "import sys, agent; print(len([m for m in sys.modules if m.startswith(('numpy','onnxruntime','paho'))]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
