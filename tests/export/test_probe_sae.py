"""The split-point probe and the sparse autoencoder."""

import json

import numpy as np
import pytest

from agent.bundle import load_bundle
from agent.memory.sparse import SparseCoder
from export.sae import SAEConfig, check_sae_arrays, sae_codes, sae_reconstruct, train_sae
from tests.export.conftest import SAE_TEST
from tests.export.test_cli import assert_one_line_error, run


def test_probe_command_prints_a_sane_table_and_writes_json(capsys, digits_npz, tmp_path):
    out = tmp_path / "probe.json"
    rc, stdout, err = run(capsys, "probe", "--data", str(digits_npz), "--base-classes", "5",
                          "--epochs", "8", "--json", str(out))
    assert rc == 0, err
    assert "| split | latent taken |" in stdout
    result = json.loads(out.read_text())
    assert result["held_out_classes"] == [str(i) for i in range(5, 10)]
    rows = {r["split"]: r for r in result["table"]}
    assert set(rows) == {None, 1, 2}            # the input reference, then every split
    assert rows[1]["latent_dim"] == 256 and rows[2]["latent_dim"] == 64
    for r in rows.values():                     # chance is 10% / 20%
        assert r["accuracy_all"]["mean"] > 0.6
        assert r["accuracy_novel"]["mean"] > 0.5
        assert r["accuracy_base"]["mean"] > 0.6


def test_probe_refuses_a_base_that_leaves_no_novel_class(capsys, digits_npz):
    rc, _, err = run(capsys, "probe", "--data", str(digits_npz), "--base-classes", "10")
    assert_one_line_error(rc, err, "base_classes=10")


def test_sae_in_the_bundle_loads_without_pickle_and_is_as_sparse_as_asked(digits5_bundle):
    m = load_bundle(digits5_bundle).manifest["sae"]
    cfg = SAEConfig(**SAE_TEST)
    with np.load(digits5_bundle / "sae.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    assert sorted(arrays) == ["W_dec", "W_enc", "b_dec", "b_enc", "k"]
    assert check_sae_arrays(arrays, 256) is None
    assert arrays["W_enc"].shape == (512, 256) and int(arrays["k"]) == cfg.k == 10
    assert m["config"]["k"] == 10 and m["latent_dim"] == 256
    assert abs(cfg.k / cfg.n_units - cfg.active_fraction) <= 1 / cfg.n_units
    assert m["active_fraction"] == pytest.approx(cfg.k / cfg.n_units, abs=1e-3)
    assert 0 <= m["relative_mse_test"] < 0.5 and 0 <= m["dead_fraction"] < 1
    assert m["relative_mse_held_out"] > 0 and m["n_held_out"] > 0  # digits 5-9
    # The device's sparse coder reads the same arrays and picks the same units.
    coder = SparseCoder.from_sae(arrays["W_enc"], arrays["b_enc"], int(arrays["k"]))
    Z = np.random.default_rng(0).gamma(1.0, 1.0, (16, 256)).astype(np.float32)
    ids = coder.encode(Z)                                       # (16, k)
    dense = sae_codes(arrays, Z)                                # (16, m)
    for row, code in zip(dense, ids, strict=True):
        assert set(np.flatnonzero(row)) <= set(code.tolist())


def test_sae_is_seeded_reconstructs_and_keeps_k_active():
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((24, 32)).astype(np.float32)
    Z = np.maximum(rng.standard_normal((600, 24)).astype(np.float32) @ basis, 0)
    cfg = SAEConfig(n_units=256, active_fraction=0.03, steps=200, seed=1)
    a, report = train_sae(Z[:500], Z[500:], cfg)
    b, _ = train_sae(Z[:500], Z[500:], cfg)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert report["relative_mse_test"] < 0.5
    codes = sae_codes(a, Z[500:])
    assert (np.count_nonzero(codes, axis=1) <= cfg.k).all()
    assert report["active_fraction"] == pytest.approx(cfg.k / cfg.n_units, abs=0.5 / 256)
    rel = ((sae_reconstruct(a, Z[500:]) - Z[500:]) ** 2).sum() / ((Z[500:] - Z[:500].mean(0)) ** 2).sum()
    assert rel == pytest.approx(report["relative_mse_test"], rel=1e-3)
