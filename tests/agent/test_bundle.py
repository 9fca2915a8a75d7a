"""agent.bundle.load_bundle: manifest validation, file hashes, and signed bundles.

`sim_bundle` is shared by the session: every test that changes a bundle copies it first.
Signing here uses cryptography directly, so these tests do not depend on `export`.
"""

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundle import SIGNATURE, load_bundle, write_manifest
from agent.daemon_cli import _public_keys
from agent.errors import BundleError
from agent.signing import PublicKey, Signature


def _key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"bundle-key%d" % seed).digest())


def _key_id(key: Ed25519PrivateKey) -> str:
    return PublicKey(key.public_key().public_bytes_raw()).key_id


def _write_public(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def _sign(bundle: Path, key: Ed25519PrivateKey) -> None:
    raw = (bundle / "manifest.json").read_bytes()
    sig = Signature(_key_id(key), hashlib.sha256(raw).hexdigest(), key.sign(raw))
    (bundle / SIGNATURE).write_bytes(sig.to_bytes())


def _flip_byte(path: Path, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _edit_manifest(bundle: Path, **changes) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def bundle(sim_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(sim_bundle, tmp_path / "bundle"))


@pytest.fixture
def key_a():
    return _key(1)


@pytest.fixture
def pub_a(key_a, tmp_path) -> Path:
    return _write_public(key_a, tmp_path / "a.pub")


@pytest.fixture
def signed(bundle, key_a) -> Path:
    _sign(bundle, key_a)
    return bundle


# --- unsigned: the manifest and the hashes --------------------------------------------------


def test_a_bundle_loads_and_describes_itself(sim_bundle):
    b = load_bundle(sim_bundle)
    raw = (sim_bundle / "manifest.json").read_bytes()
    assert b.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    assert b.bundle_id == b.manifest_sha256[:12] and b.signed_by is None
    assert b.input.shape == (6, 128) and len(b.classes) >= 2


@pytest.mark.parametrize("keys", [False, True], ids=["no-key", "with-key"])
def test_a_tampered_model_is_refused_with_or_without_a_key(signed, pub_a, keys):
    _flip_byte(signed / "model.onnx")
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 mismatch .* modified or corrupted"):
        load_bundle(signed, public_keys=[pub_a] if keys else None)


def test_a_missing_listed_file_is_refused(bundle):
    (bundle / "weights.npz").unlink()
    with pytest.raises(BundleError, match="'weights.npz' listed in the manifest is missing"):
        load_bundle(bundle)


@pytest.mark.parametrize("edit, message", [
    (lambda b: shutil.rmtree(b), "does not exist"),
    (lambda b: (b / "manifest.json").unlink(), "missing manifest.json"),
    (lambda b: (b / "manifest.json").write_text("{"), "not valid JSON"),
    (lambda b: (b / "manifest.json").write_text("[]"), "must be a JSON object"),
    (lambda b: _edit_manifest(b, format_version=2), "format_version=2, this agent reads 1"),
    (lambda b: _edit_manifest(b, files={}), "'files' must map file names"),
    (lambda b: _edit_manifest(b, files={"../x": {"sha256": "0"}}), "bad file name '../x'"),
    (lambda b: _edit_manifest(b, files={"manifest.sig": {"sha256": "0"}}),
     "bad file name 'manifest.sig'"),
    (lambda b: _edit_manifest(b, classes=["a"]), "expected >= 2 distinct"),
])
def test_malformed_manifests_get_one_clear_error(bundle, edit, message):
    edit(bundle)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_write_manifest_never_lists_the_signature(bundle, key_a):
    _sign(bundle, key_a)
    write_manifest(bundle, json.loads((bundle / "manifest.json").read_text()))
    assert SIGNATURE not in json.loads((bundle / "manifest.json").read_text())["files"]
    load_bundle(bundle)


# --- signed ---------------------------------------------------------------------------------


def test_a_signed_bundle_loads_with_its_key_and_keeps_its_id(bundle, key_a, pub_a):
    before = load_bundle(bundle)
    _sign(bundle, key_a)
    after = load_bundle(bundle, public_keys=[pub_a])
    assert after.signed_by == _key_id(key_a)
    assert after.bundle_id == before.bundle_id and after.manifest == before.manifest


def test_without_a_key_the_signature_is_not_checked(signed):
    (signed / SIGNATURE).write_text("garbage")
    assert load_bundle(signed).signed_by is None
    assert load_bundle(signed, public_keys=[]).signed_by is None


def test_a_manifest_modified_after_signing_is_refused(signed, pub_a, key_a):
    _edit_manifest(signed, name="evil")  # hashes still match: only the signature can tell
    assert load_bundle(signed).manifest["name"] == "evil"
    with pytest.raises(BundleError, match=f"signature does not verify with key {_key_id(key_a)}"
                       ": manifest.json was modified after it was signed"):
        load_bundle(signed, public_keys=[pub_a])


def test_a_retargeted_model_with_a_fixed_up_manifest_is_refused(signed, pub_a, key_a):
    # The attacker replaces the model and rewrites the manifest's hashes: refused.
    (signed / "model.onnx").write_bytes(b"evil model")
    write_manifest(signed, json.loads((signed / "manifest.json").read_text()))
    with pytest.raises(BundleError, match="signature does not verify"):
        load_bundle(signed, public_keys=[pub_a])


def test_the_wrong_key_is_refused_naming_both_ids(signed, tmp_path, key_a):
    key_b = _key(2)
    with pytest.raises(BundleError) as info:
        load_bundle(signed, public_keys=[_write_public(key_b, tmp_path / "b.pub")])
    assert f"signed by unknown key {_key_id(key_a)} (trusted: {_key_id(key_b)})" in str(info.value)


def test_an_unsigned_bundle_is_refused_when_a_key_is_configured(bundle, pub_a):
    with pytest.raises(BundleError, match="bundle is unsigned .* but a public key is configured"):
        load_bundle(bundle, public_keys=[pub_a])


def test_key_rotation_either_trusted_key_verifies(bundle, tmp_path, key_a, pub_a):
    key_b = _key(2)
    trusted = [pub_a, _write_public(key_b, tmp_path / "b.pub")]
    for key in (key_a, key_b):
        _sign(bundle, key)
        assert load_bundle(bundle, public_keys=trusted).signed_by == _key_id(key)


@pytest.mark.parametrize("content", [b"{not json", b'{"alg": "ed25519"}', b""])
def test_a_corrupted_signature_file_is_refused_clearly(signed, pub_a, content):
    (signed / SIGNATURE).write_bytes(content)
    with pytest.raises(BundleError, match=r"manifest\.sig: .*the signature file is damaged"):
        load_bundle(signed, public_keys=[pub_a])


def test_unlisted_files_are_refused_in_strict_mode_and_warned_about_otherwise(signed, pub_a,
                                                                              caplog):
    (signed / "extra.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="'extra.onnx' not listed in manifest.json"):
        load_bundle(signed, public_keys=[pub_a])
    with caplog.at_level(logging.WARNING, logger="reverie.bundle"):
        load_bundle(signed)
    assert "ignoring 'extra.onnx'" in caplog.text


def test_a_public_key_may_be_given_as_bytes_or_object(signed, key_a):
    raw = key_a.public_key().public_bytes_raw()
    assert load_bundle(signed, public_keys=[raw]).signed_by == _key_id(key_a)
    assert load_bundle(signed, public_keys=[PublicKey(raw)]).signed_by == _key_id(key_a)


# --- the daemon -------------------------------------------------------------------------------


@pytest.fixture
def run_cli():
    """`agent.cli.main`; `reverie run` installs a root log handler on the captured stderr,
    which later tests' threads would write to after capture closed: put the old ones back."""
    from agent.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield main
    root.handlers[:] = handlers
    root.setLevel(level)


def test_run_refuses_a_bad_signature_with_one_line(signed, tmp_path, capsys, key_a, run_cli):
    _edit_manifest(signed, name="evil")
    rc = run_cli(["run", "--bundle", str(signed), "--device-id", "d",
               "--public-key", str(_write_public(key_a, tmp_path / "a.pub"))])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "signature does not verify" in err


def test_run_refuses_an_unsigned_bundle_when_the_env_configures_a_key(bundle, pub_a, capsys,
                                                                      monkeypatch, run_cli):
    monkeypatch.setenv("REVERIE_PUBLIC_KEY", str(pub_a))
    rc = run_cli(["run", "--bundle", str(bundle), "--device-id", "d"])
    err = capsys.readouterr().err
    assert rc == 2 and "bundle is unsigned" in err and "Traceback" not in err


def test_run_refuses_a_missing_key_file_as_a_config_error(bundle, tmp_path, capsys, run_cli):
    rc = run_cli(["run", "--bundle", str(bundle), "--device-id", "d",
               "--public-key", str(tmp_path / "nope.pub")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.pub: cannot read" in err


def test_the_daemon_loads_a_signed_bundle(signed, pub_a, key_a):
    from agent.config import AgentConfig
    from agent.daemon import Daemon

    d = Daemon(AgentConfig(bundle=signed, device_id="d",
                           public_keys=[str(pub_a)]))  # no connection until start()
    assert d.config.public_keys == (pub_a,) and d.bundle.signed_by == _key_id(key_a)


def test_public_keys_repeat_or_separate_with_commas():
    assert _public_keys(["a.pub,b.pub", " c.pub ", ""]) == (Path("a.pub"), Path("b.pub"),
                                                           Path("c.pub"))
    assert _public_keys([""]) == ()
