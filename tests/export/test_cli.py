"""`reverie export ...` through agent.cli.main: exit codes and one-line errors."""

import subprocess
import sys

import numpy as np
import pytest

from agent.bundle import load_bundle
from agent.cli import main
from agent.dataset import save_dataset


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["export", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, match: str) -> None:
    assert rc == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("reverie export: error:")]
    assert len(lines) == 1 and match in lines[0], err


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, export.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_train_then_verify(capsys, digits_npz, tmp_path):
    out = tmp_path / "bundle"
    rc, stdout, err = run(capsys, "train", "--data", str(digits_npz), "--out", str(out),
                          "--epochs", "2", "--seed", "1", "--name", "digits-cli")
    assert rc == 0, err
    assert "epoch 1/2" in err and f"wrote {out}" in stdout
    assert load_bundle(out).manifest["name"] == "digits-cli"
    rc, stdout, _ = run(capsys, "verify", str(out), "--data", str(digits_npz))
    assert rc == 0 and "bundle OK" in stdout


def test_verify_of_a_tampered_bundle_exits_2(capsys, digits_bundle, tmp_path):
    import shutil

    copy = shutil.copytree(digits_bundle, tmp_path / "copy")
    (copy / "weights.npz").write_bytes(b"x")
    rc, _, err = run(capsys, "verify", str(copy))
    assert_one_line_error(rc, err, "weights.npz")


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


RNG = np.random.default_rng(0)
X_OK = RNG.standard_normal((40, 8)).astype(np.float32)
Y_OK = np.arange(40) % 4


@pytest.mark.parametrize("arrays, match", [
    ({"X": X_OK}, "missing key 'y'"),
    ({"X": X_OK.reshape(40, 2, 2, 2), "y": Y_OK}, "expected shape (N, C, T) or (N, F)"),
    ({"X": np.where(np.eye(40, 8) > 0, np.nan, X_OK), "y": Y_OK}, "NaN"),
    ({"X": X_OK.astype(str), "y": Y_OK}, "expected a float array"),
    ({"X": X_OK.astype(object), "y": Y_OK}, "needs pickle: refused"),
    ({"X": X_OK, "y": np.zeros(40, int)}, "training needs >= 2 classes"),
    ({"X": X_OK[:5], "y": np.array([0, 0, 0, 0, 1])}, "too few training samples per class"),
])
def test_malformed_datasets_give_one_line_errors(capsys, tmp_path, arrays, match):
    data = _npz(tmp_path / "bad.npz", **arrays)
    out = tmp_path / "bundle"
    rc, _, err = run(capsys, "train", "--data", str(data), "--out", str(out), "--epochs", "1")
    assert_one_line_error(rc, err, match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]  # nothing half-written


def test_cnn1d_on_feature_vectors_is_refused(capsys, digits_npz, tmp_path):
    rc, _, err = run(capsys, "train", "--data", str(digits_npz), "--out", str(tmp_path / "b"),
                     "--arch", "cnn1d")
    assert_one_line_error(rc, err, "arch 'cnn1d' needs (C, T) windows")


def test_unknown_arch_is_a_usage_error(capsys, digits_npz, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["export", "train", "--data", str(digits_npz), "--out", str(tmp_path / "b"),
              "--arch", "transformer"])
    assert exc.value.code == 2
    assert "invalid choice: 'transformer'" in capsys.readouterr().err


def test_unwritable_output_is_refused(capsys, digits_npz, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc, _, err = run(capsys, "train", "--data", str(digits_npz), "--out",
                     str(blocker / "bundle"), "--epochs", "1", "--quiet")
    assert_one_line_error(rc, err, "cannot create the bundle directory")


def test_missing_data_file(capsys, tmp_path):
    rc, _, err = run(capsys, "train", "--data", str(tmp_path / "nope.npz"), "--out",
                     str(tmp_path / "b"))
    assert_one_line_error(rc, err, "no such file")


def test_save_dataset_string_labels_round_trip_through_training(capsys, tmp_path):
    X = np.random.default_rng(1).standard_normal((30, 4)).astype(np.float32)
    X[:15] += 3.0
    data = save_dataset(tmp_path / "d.npz", X, np.array(["off"] * 15 + ["on"] * 15))
    rc, _, err = run(capsys, "train", "--data", str(data), "--out", str(tmp_path / "b"),
                     "--epochs", "3", "--quiet")
    assert rc == 0, err
    assert load_bundle(tmp_path / "b").classes == ("off", "on")
