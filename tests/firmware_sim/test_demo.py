"""`reverie demo` end to end in a short mode, on the session broker and bundle."""

import json

from agent.cli import main


def test_demo_short_run(sim_bundle, broker_url, broker, capsys):
    rc = main(["demo", "--bundle", str(sim_bundle), "--broker", broker_url, "--devices", "2",
               "--duration", "4", "--speed", "8", "--quiet", "--protocol", broker.protocols[-1]])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads(out.split("[demo] summary ", 1)[1].split("\n[demo]", 1)[0])
    assert summary["windows"] >= 4 and summary["error_events"] == 0
    assert summary["accuracy"] >= 0.7
