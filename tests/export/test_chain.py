"""The whole chain a user runs, through the CLI: train -> verify -> quantize -> sign ->
load on the device (signature enforced) -> the learner learns a held-out class.

On sklearn digits (mlp, base 0-4) and on the simulator's 6-channel windows (cnn1d, base 4
of 6 classes), with a tampered file and a foreign signature refused at the end.
"""

import shutil

import numpy as np
import pytest

from agent.bundle import load_bundle
from agent.cli import main
from agent.dataset import load_dataset
from agent.errors import BundleError
from agent.learner import Learner


@pytest.fixture(scope="module")
def sim_npz(tmp_path_factory):
    from firmware_sim.signals import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data") / "sim.npz", n_per_class=50, seed=0)


def _cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


@pytest.mark.parametrize("dataset, base", [("digits", 5), ("sim", 4)])
def test_train_verify_quantize_sign_load_learn(dataset, base, digits_npz, sim_npz, tmp_path,
                                               capsys):
    data = digits_npz if dataset == "digits" else sim_npz
    b, q = tmp_path / "bundle", tmp_path / "bundle-int8"
    keys = f"{tmp_path}/keys/"                      # a trailing "/": a directory of keys
    _cli(capsys, "export", "train", "--data", str(data), "--out", str(b),
         "--base-classes", str(base), "--epochs", "15", "--quiet")
    _cli(capsys, "export", "verify", str(b), "--data", str(data))
    _cli(capsys, "export", "quantize", str(b), "--calibration", str(data), "--out", str(q),
         "--force", "--iterations", "50")
    _cli(capsys, "export", "verify", str(q), "--data", str(data))
    _cli(capsys, "export", "keygen", "--out", keys)
    pub = tmp_path / "keys" / "signing.pub"
    for bundle in (b, q):
        _cli(capsys, "export", "sign", str(bundle), "--key", str(tmp_path / "keys/signing.key"))
        out = _cli(capsys, "export", "verify", str(bundle), "--public-key", str(pub))
        assert "signature OK" in out

    # On the device: the signed int8 bundle loads with the key and learns a new class.
    ds = load_dataset(data)
    names = np.array([ds.classes[i] for i in ds.y])
    test_names = np.array([ds.classes[i] for i in ds.y_test])
    with Learner.from_bundle(q, public_keys=[pub]) as L:
        assert L.bundle.signed_by
        new = next(c for c in ds.classes if c not in L.classes)
        for i in np.flatnonzero(names == new)[:5]:
            L.learn_one(ds.X[i], new)
        mask = test_names == new
        preds = L.predict_many(ds.X_test[mask])
        assert np.mean([p.label == new for p in preds]) > 0.4   # far above chance (~1/K)

    # A tampered copy and a bundle signed by someone else are refused.
    bad = tmp_path / "tampered"
    shutil.copytree(q, bad)
    with open(bad / "head.npz", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(bad, public_keys=[pub])
    _cli(capsys, "export", "keygen", "--out", f"{tmp_path}/other/")
    _cli(capsys, "export", "sign", str(b), "--key", str(tmp_path / "other/signing.key"))
    with pytest.raises(BundleError, match="unknown key"):
        load_bundle(b, public_keys=[pub])
