"""The README runs: its tour, pasted top to bottom, works; docs/protocol.md's examples decode.

`test_the_tour_runs` joins the shell and Python blocks of README.md's "A short tour" in
order into one bash script (a Python block becomes ``python - <<'PY' ... PY``), with
``set -e``, and runs it from the repository root with the knobs the tour itself reads:
``REVERIE_TOUR_SECONDS`` (streaming steps), ``REVERIE_TOUR_EPOCHS`` (training),
``REVERIE_TOUR_WINDOWS`` (the dataset's windows per class) and ``REVERIE_TOUR_PORT`` (its
private broker, a free port; the metrics port is the next one).
The tour starts that broker itself (``reverie sim broker``) and works in ``mktemp -d``
(here under the test's tmp_path). A line that fails stops the script and fails the test;
the outputs the tour promises (predictions, the label's event, the command's reply,
/metrics) are checked too. Whatever the script left running is ended with its process
group.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PROTOCOL = ROOT / "docs" / "protocol.md"
TOUR_HEADING = "## A short tour"
TOUR_ENV = {"REVERIE_TOUR_SECONDS": "3", "REVERIE_TOUR_EPOCHS": "2",
            "REVERIE_TOUR_WINDOWS": "60"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def section(text: str, heading: str) -> str:
    """The text under `heading` (a ``## `` line) up to the next ``## `` heading."""
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end >= 0 else len(text)]


def code_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def tour_script() -> str:
    """The tour's blocks as one bash script."""
    lines = ["set -e -o pipefail", "set -x"]
    for lang, code in code_blocks(section(README.read_text(), TOUR_HEADING)):
        if lang == "sh":
            lines.append(code)
        elif lang == "python":
            lines.append(f"python - <<'PY'\n{code}PY")
        else:
            raise AssertionError(f"README tour: a ```{lang} block; the test runs sh and python")
    return "\n".join(lines) + "\n"


def test_the_tour_is_what_the_test_runs():
    blocks = code_blocks(section(README.read_text(), TOUR_HEADING))
    assert [lang for lang, _ in blocks].count("python") == 1
    script = tour_script()
    # every command names the tour's broker: no implicit mqtt://127.0.0.1:1883
    assert not re.search(r"\b1883\b", script.replace("not 1883", ""))
    for line in script.splitlines():
        if re.match(r"\s*reverie (run|sim)\b", line) and " sim dataset" not in line \
                and "--config" not in line \
                and " sim broker" not in line:
            assert "--broker $BROKER" in line, line
        if re.match(r"\s*mosquitto_(sub|pub|rr)\b", line):
            assert "-p $PORT" in line, line


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the tour's broker and its metrics)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two consecutive free ports")


def _tools_missing() -> list[str]:
    from firmware_sim.broker import find_mosquitto

    missing = [t for t in ("mosquitto_sub", "mosquitto_rr", "curl") if not shutil.which(t)]
    return missing + ([] if find_mosquitto() else ["mosquitto"])


@pytest.mark.broker       # it starts its own (the tour's `reverie sim broker`)
@pytest.mark.skipif(bool(_tools_missing()), reason=f"the tour needs {_tools_missing()}")
def test_the_tour_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVERIE_")}
    env.update(TOUR_ENV, REVERIE_TOUR_PORT=str(_free_port_pair()), TMPDIR=str(tmp_path),
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin")
    script = tmp_path / "tour.sh"
    script.write_text(tour_script())
    proc = subprocess.Popen(["bash", str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)   # the broker or a daemon a failure left behind
        except ProcessLookupError:
            pass
        proc.wait()
    tail = "\n".join(out.splitlines()[-60:])
    assert proc.returncode == 0, f"the README tour failed:\n{tail}"
    assert "Traceback" not in out, tail
    predictions = [ln for ln in out.splitlines() if re.match(r"reverie/v1/\S+/predictions ", ln)]
    assert len(predictions) == 3, tail
    events = [json.loads(ln) for ln in out.splitlines() if ln.startswith('{"v":1,"device":"dev1"')]
    assert any(e.get("id") == "L1" and e["reason"] == "learned" and e["windows"] == 2
               for e in events), tail
    replies = [json.loads(ln) for ln in out.splitlines() if '"cmd":"sleep"' in ln]
    assert any(r["id"] == "c1" and r["ok"] is True for r in replies), tail
    assert re.search(r"^reverie_up 1(\.0)?$", out, re.M), tail
    assert re.search(r"^reverie_labels_learned_total [1-9]", out, re.M), tail
    assert "# checks" in out and "ok: agent.bundle = " in out, tail


# ---------------------------------------------------------------------- docs/protocol.md

def _objects(code: str) -> list[dict]:
    """Every JSON object in a ```json block (one per line, or one spanning lines)."""
    dec, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(code) and code[i].isspace():
            i += 1
        if i == len(code):
            return out
        obj, i = dec.raw_decode(code, i)
        out.append(obj)


def protocol_examples() -> list[tuple[str, dict]]:
    """``(section, object)`` for every JSON example of docs/protocol.md."""
    found, heading = [], ""
    text = PROTOCOL.read_text()
    pos = 0
    for m in FENCE.finditer(text):
        for h in re.finditer(r"^## (.+)$", text[pos:m.start()], re.M):
            heading = h.group(1)
        pos = m.end()
        if m.group(1) == "json":
            found += [(heading, obj) for obj in _objects(m.group(2))]
    return found


def test_every_protocol_example_decodes_with_the_agents_decoders():
    from agent.messages import decode_command, decode_label, encode_reply
    from agent.protocol import (
        decode_frame,
        decode_json_object,
        encode_event,
        encode_prediction,
        encode_status,
    )

    examples = protocol_examples()
    seen = {heading for heading, _ in examples}
    assert {"Frames", "Predictions", "Events", "Labels", "Commands and replies",
            "Status"} <= seen
    for heading, obj in examples:
        raw = json.dumps(obj).encode()
        body = decode_json_object(raw, heading)
        if heading == "Frames":
            frame = decode_frame(raw)
            assert (frame.seq, frame.n_channels) == (obj["seq"], len(obj["values"][0]))
        elif heading == "Labels":
            assert decode_label(raw, max_bytes=1 << 16).label == obj["label"]
        elif heading == "Commands and replies" and "ok" not in obj:
            assert decode_command(raw).cmd == obj["cmd"]
        elif heading == "Commands and replies":      # a reply: what encode_reply writes
            fields = {k: v for k, v in body.items() if k != "v"}
            assert json.loads(encode_reply(**fields)) == body
        elif heading == "Events":
            fields = {k: v for k, v in body.items() if k != "v"}
            assert json.loads(encode_event(**fields)) == body
        elif heading == "Status":
            fields = {k: v for k, v in body.items() if k not in ("v", "state")}
            assert json.loads(encode_status(state=body["state"], **fields)) == body
        elif heading == "Predictions":
            fields = {k: v for k, v in body.items() if k != "v"}
            assert set(json.loads(encode_prediction(**fields))) == set(body)
        else:
            raise AssertionError(f"docs/protocol.md: a JSON example under {heading!r}: "
                                 "add how to decode it here")
