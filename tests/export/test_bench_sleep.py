import json

from agent.cli import main


def test_bench_sleep_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sleep.json"
    rc = main(["bench", "sleep", "--samples", "640", "--repeats", "1", "--dims", "16,8,3",
               "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())["results"][0]
    assert res["n_samples"] == 640 and res["numba_s"] > 0 and res["torch_s"] > 0
    assert res["max_param_diff_50_steps"] < 1e-4   # the two implementations agree
