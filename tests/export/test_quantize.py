"""`reverie export quantize` and `reverie bench latency`: int8 bundles that load, run and
verify; refusals that leave nothing behind; the benchmark end to end."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from agent.bench.timing import interleaved_times
from agent.bundle import SIGNATURE, load_bundle, sha256_file, write_manifest
from agent.cli import main
from agent.dataset import save_dataset
from agent.head import Head
from agent.inference import Encoder, make_session
from export import verify_bundle
from export.errors import VerifyError
from export.int8 import load_calibration, with_head
from export.quantize import default_output, quantize_bundle
from tests.export.test_cli import assert_one_line_error, run

ITERATIONS = "30"  # timed windows per encoder: enough to run the code, not to measure


@pytest.fixture(scope="module")
def synthetic_int8(tmp_path_factory, synthetic_bundle, synthetic_npz) -> Path:
    out = tmp_path_factory.mktemp("int8") / "synthetic-int8"
    # max_drop: this test bundle (12 epochs, 96 test windows) is about mechanics, not accuracy
    quantize_bundle(synthetic_bundle, synthetic_npz, out, iterations=int(ITERATIONS),
                    max_drop=5.0)
    return out


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)


def test_cnn1d_int8_bundle_loads_runs_and_records_what_was_done(synthetic_int8, synthetic_bundle,
                                                              synthetic_npz):
    bundle = load_bundle(synthetic_int8)  # every file rehashed
    src = load_bundle(synthetic_bundle)
    q = bundle.manifest["quantization"]
    assert q["method"] == "static" and q["format"] == "QDQ" and q["per_channel"] is True
    assert q["candidates"][1]["status"].startswith("skipped")  # no MatMul/Gemm in a conv encoder
    assert q["calibration"]["sha256"] == sha256_file(synthetic_npz)
    assert q["calibration"]["bytes"] == synthetic_npz.stat().st_size
    assert q["source_bundle"]["id"] == src.bundle_id
    assert q["accuracy_pct"]["drop_points"] <= q["max_drop_points"] == 5.0
    assert set(q["latency_us"]["before"]) == {"p50_us", "p99_us"}
    assert {"QuantizeLinear", "DequantizeLinear"} <= _op_types(bundle.file("encoder.onnx"))
    assert bundle.classes == src.classes and bundle.input == src.input

    # The device path (no special case): Encoder + numpy Head on the int8 encoder.
    cal = load_calibration(bundle, synthetic_npz)
    enc, head = Encoder(bundle), Head.from_npz(bundle.file("head.npz"), bundle.manifest)
    Z = enc.encode(cal.X_test)
    accuracy = 100 * np.mean(head.logits(Z).argmax(axis=1) == cal.y_test)
    assert accuracy == pytest.approx(q["accuracy_pct"]["after"], abs=0.01)
    # Against the slow oracle, the fp32 encoder: latents close, not equal.
    Z_fp32 = Encoder(src).encode(cal.X_test)
    rel = np.linalg.norm(Z - Z_fp32, axis=1) / np.linalg.norm(Z_fp32, axis=1)
    assert 0 < rel.mean() < 0.05


def test_verify_accepts_an_int8_bundle_and_says_which_checks_ran(capsys, synthetic_int8,
                                                                 synthetic_npz):
    report = verify_bundle(synthetic_int8, data=synthetic_npz)
    assert report.quantized and report.agreement["data"] >= 0.99
    assert report.diffs["data"]["encoder_head_vs_model"] <= 1e-4  # int8 vs int8: exact-ish
    assert report.diffs["data"]["model_vs_torch"] > 1e-4           # int8 vs fp32: not
    rc, out, err = run(capsys, "verify", str(synthetic_int8), "--data", str(synthetic_npz))
    assert rc == 0, err
    assert "quantized bundle: static int8" in out
    assert "accuracy agreement instead of 0.0001 parity" in out and "bundle OK" in out


def test_verify_of_an_int8_bundle_still_catches_weights_that_disagree(synthetic_int8,
                                                                      tmp_path):
    copy = shutil.copytree(synthetic_int8, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    with np.load(copy / "weights.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    last = max(k for k in arrays if k.startswith("dense.") and k.endswith(".weight"))
    arrays[last] = arrays[last][::-1].copy()  # torch's classes permuted
    with open(copy / "weights.npz", "wb") as f:
        np.savez(f, **arrays)
    write_manifest(copy, manifest)  # rehashed: only the parity checks can tell
    with pytest.raises(VerifyError, match="argmax agrees on"):
        verify_bundle(copy)


def test_model_onnx_is_the_int8_encoder_plus_the_numpy_head(synthetic_int8):
    bundle = load_bundle(synthetic_int8)
    head = Head.from_npz(bundle.file("head.npz"), bundle.manifest)
    X = np.random.default_rng(3).standard_normal((16, *bundle.input.shape)).astype(np.float32)
    enc, full = make_session(bundle.file("encoder.onnx")), make_session(bundle.file("model.onnx"))
    expected = head.logits(enc.run(None, {"input": X})[0])
    np.testing.assert_allclose(full.run(None, {"input": X})[0], expected, atol=1e-4)
    rebuilt = with_head(onnx.load(str(bundle.file("encoder.onnx"))), head, "latent", "logits")
    assert [o.name for o in rebuilt.graph.output] == ["logits"]


def test_mlp_tries_static_and_dynamic_and_writes_the_faster(capsys, digits_bundle, digits_npz,
                                                          tmp_path):
    out = tmp_path / "digits-int8"
    rc, stdout, err = run(capsys, "quantize", str(digits_bundle), "--calibration",
                          str(digits_npz), "--out", str(out), "--iterations", ITERATIONS)
    assert rc == 0, err
    q = load_bundle(out).manifest["quantization"]
    by = {c["method"]: c for c in q["candidates"]}
    assert by["static"]["status"] == by["dynamic"]["status"] == "ok"
    within = [c for c in by.values() if c["drop_points"] <= 1.0]
    assert q["method"] == min(within, key=lambda c: c["latency_us"]["p50_us"])["method"]
    assert "static int8 (QDQ" in stdout and "dynamic int8" in stdout and "<- written" in stdout
    assert "MatMulInteger" in _op_types(out / "encoder.onnx") or q["method"] == "static"
    verify_bundle(out, data=digits_npz)


def test_accuracy_drop_over_max_drop_is_refused_in_one_line(capsys, digits_bundle, digits_npz,
                                                             tmp_path):
    out = tmp_path / "refused"
    rc, _, err = run(capsys, "quantize", str(digits_bundle), "--calibration", str(digits_npz),
                     "--out", str(out), "--max-drop", "-100", "--iterations", ITERATIONS)
    assert_one_line_error(rc, err, "exceeds --max-drop -100 (fp32 ")
    assert "nothing written" in err
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory

    rc, stdout, err = run(capsys, "quantize", str(digits_bundle), "--calibration",
                          str(digits_npz), "--out", str(out), "--max-drop", "-100", "--force",
                          "--iterations", ITERATIONS)
    assert rc == 0, err
    assert "FORCED" in stdout and load_bundle(out).manifest["quantization"]["forced"] is True


def _bad_calibrations(tmp_path: Path, digits_npz: Path) -> dict[str, tuple[Path, str]]:
    rng = np.random.default_rng(0)
    missing_y = tmp_path / "missing_y.npz"
    np.savez(missing_y, X=rng.standard_normal((40, 6, 128)).astype(np.float32))
    other = save_dataset(tmp_path / "other.npz",
                         rng.standard_normal((40, 6, 128)).astype(np.float32),
                         np.array(["swim", "fly"] * 20))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    return {"wrong shape": (digits_npz, "windows have shape [64], the bundle expects [6, 128]"),
            "missing key": (missing_y, "missing key 'y'"),
            "no such file": (tmp_path / "nope.npz", "no such file"),
            "not an npz": (garbage, "garbage.npz: not a readable .npz"),
            "other classes": (other, "none of the bundle's classes")}


@pytest.mark.parametrize("case", ["wrong shape", "missing key", "no such file", "not an npz",
                                  "other classes"])
def test_bad_calibration_files_give_one_line_errors(capsys, synthetic_bundle, digits_npz,
                                                    tmp_path, case):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path, match = _bad_calibrations(data_dir, digits_npz)[case]
    out = tmp_path / "out"
    rc, _, err = run(capsys, "quantize", str(synthetic_bundle), "--calibration", str(path),
                     "--out", str(out))
    assert_one_line_error(rc, err, match)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_failure_while_writing_leaves_nothing(monkeypatch, digits_bundle, digits_npz,
                                                tmp_path):
    import export.verify

    def broken(*_a, **_k):
        raise VerifyError("injected")

    monkeypatch.setattr(export.verify, "verify_bundle", broken)
    with pytest.raises(VerifyError, match="injected"):
        quantize_bundle(digits_bundle, digits_npz, tmp_path / "out", iterations=5)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_signed_source_and_requantizing(capsys, synthetic_int8, synthetic_bundle,
                                                        synthetic_npz, tmp_path):
    from export.sign import keygen, sign_bundle

    rc, _, err = run(capsys, "quantize", str(synthetic_int8), "--calibration",
                     str(synthetic_npz))
    assert_one_line_error(rc, err, "already quantized (static)")
    signed = shutil.copytree(synthetic_bundle, tmp_path / "signed")
    sign_bundle(signed, keygen(tmp_path / "keys" / "k")[0])
    (tmp_path / "signed-int8").mkdir()
    (tmp_path / "signed-int8" / "unrelated.txt").write_text("x")
    rc, _, err = run(capsys, "quantize", str(signed), "--calibration", str(synthetic_npz))
    assert_one_line_error(rc, err, "exists and is not empty; pass --overwrite")
    rc, _, err = run(capsys, "quantize", str(signed), "--calibration", str(synthetic_npz),
                     "--overwrite")
    assert_one_line_error(rc, err, "not a bundle (no manifest.json); refusing to replace it "
                                   "even with --overwrite")
    shutil.rmtree(tmp_path / "signed-int8")
    rc, out, err = run(capsys, "quantize", str(signed), "--calibration", str(synthetic_npz),
                       "--iterations", ITERATIONS)
    assert rc == 0, err
    assert default_output(signed) == tmp_path / "signed-int8"
    assert not (tmp_path / "signed-int8" / SIGNATURE).exists() and "re-sign" in out
    assert load_bundle(tmp_path / "signed-int8").manifest["quantization"]["source_bundle"][
        "signed"] is True
    rc, _, err = run(capsys, "quantize", str(signed), "--calibration", str(synthetic_npz))
    assert_one_line_error(rc, err, "exists and is not empty; pass --overwrite")
    rc, _, err = run(capsys, "quantize", str(signed), "--calibration", str(synthetic_npz),
                     "--overwrite", "--iterations", ITERATIONS)
    assert rc == 0, err


def test_interleaved_times_gives_every_function_the_same_inputs():
    seen: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    fns = {k: (lambda x, k=k: seen[k].append(int(x[0]))) for k in seen}
    xs = np.arange(7)[:, None]
    times = interleaved_times(fns, xs, iterations=23, block=5, warmup=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 23, "b": 23, "c": 23}
    assert seen["a"] == seen["b"] == seen["c"]


def test_bench_latency_end_to_end(capsys, synthetic_bundle, synthetic_int8, synthetic_npz,
                                  tmp_path):
    out = tmp_path / "lat.json"
    rc = main(["bench", "latency", "--bundle", str(synthetic_bundle), "--int8",
               str(synthetic_int8), "--data", str(synthetic_npz), "--iterations", "20",
               "--episodes", "50", "--json", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out.read_text())
    names = [r["encoder"] for r in res["encoders"]]
    assert names == ["onnxruntime fp32", "onnxruntime int8 static (--int8)", "torch eager"]
    assert all(r["p50_us"] > 0 and r["accuracy_pct"] is not None for r in res["encoders"])
    assert [r["path"].split(" (")[0] for r in res["predict"]] == [
        "Encoder.encode", "predict_one", "Encoder.encode", "predict_one"]
    assert res["environment"]["cpus"] >= 1 and len(res["targets"]) == 4
    assert "torch eager" in stdout and "predict_one" in stdout

    # Without --int8: quantized on the fly from --data; without data, int8 is skipped.
    rc = main(["bench", "latency", "--bundle", str(synthetic_bundle), "--iterations", "10",
               "--episodes", "10"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert "int8: skipped: no --int8 bundle and no --data" in stdout


def test_registering_the_bench_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, agent.cli; agent.cli.build_parser(); "
            "print('torch' in sys.modules, 'onnxruntime.quantization' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
