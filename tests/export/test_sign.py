"""export.sign: keygen and sign (library and CLI handlers), checked by the agent's loader."""

import argparse
import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundle import SIGNATURE, load_bundle
from agent.errors import BundleError, ConfigError
from agent.signing import load_public_key
from export.sign import (
    key_paths,
    keygen,
    load_private_key,
    register_keygen,
    register_sign,
    sign_bundle,
    verify_signature,
)


def _cli(argv: list[str]) -> int:
    """`reverie export ...` as export/cli.py wires it: keygen and sign on the export group."""
    parser = argparse.ArgumentParser(prog="reverie export")
    sub = parser.add_subparsers(dest="export_command", required=True)
    register_keygen(sub)
    register_sign(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def bundle(sim_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(sim_bundle, tmp_path / "bundle"))


@pytest.fixture
def keys(tmp_path):
    return keygen(tmp_path / "keys" / "release")


# --- keygen -----------------------------------------------------------------------------------


def test_keygen_writes_a_0600_private_key_and_a_public_key(tmp_path, capsys):
    assert _cli(["keygen", "--out", str(tmp_path / "k" / "release")]) == 0
    private, public = tmp_path / "k" / "release.key", tmp_path / "k" / "release.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    key_id = load_public_key(public).key_id
    out = capsys.readouterr().out
    assert key_id in out and "--public-key" in out
    derived = load_private_key(private).public_key().public_bytes_raw()
    assert derived == load_public_key(public).raw


def test_keygen_into_a_new_directory_named_with_a_trailing_slash(tmp_path):
    assert _cli(["keygen", "--out", f"{tmp_path}/keys/"]) == 0
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["signing.key", "signing.pub"]


def test_keygen_refuses_to_overwrite_either_file(tmp_path):
    private, public, _ = keygen(tmp_path / "release")
    before = private.read_bytes(), public.read_bytes()
    with pytest.raises(ConfigError, match=r"release\.key: already exists; refusing to overwrite"):
        keygen(tmp_path / "release")
    public.unlink()
    (tmp_path / "other.pub").write_text("mine")
    with pytest.raises(ConfigError, match=r"other\.pub: already exists"):
        keygen(tmp_path / "other")
    assert not (tmp_path / "other.key").exists()  # no half pair left behind
    assert private.read_bytes() == before[0]


def test_key_paths_for_a_directory_or_a_prefix(tmp_path):
    assert key_paths(tmp_path) == (tmp_path / "signing.key", tmp_path / "signing.pub")
    assert key_paths(f"{tmp_path}/new/") == (tmp_path / "new" / "signing.key",
                                             tmp_path / "new" / "signing.pub")
    assert key_paths(tmp_path / "r.key") == (tmp_path / "r.key", tmp_path / "r.pub")
    assert key_paths(tmp_path / "v1.2") == (tmp_path / "v1.2.key", tmp_path / "v1.2.pub")


# --- sign -------------------------------------------------------------------------------------


def test_sign_then_load_with_the_public_key(bundle, keys, capsys):
    private, public, key_id = keys
    manifest = (bundle / "manifest.json").read_bytes()
    bundle_id = load_bundle(bundle).bundle_id
    assert _cli(["sign", str(bundle), "--key", str(private)]) == 0
    assert f"with key {key_id}" in capsys.readouterr().out
    assert (bundle / "manifest.json").read_bytes() == manifest  # signing leaves the id alone
    b = load_bundle(bundle, public_keys=[public])
    assert b.signed_by == key_id and b.bundle_id == bundle_id
    assert verify_signature(bundle, public) == key_id
    assert sorted(p.name for p in bundle.iterdir()) == sorted(
        [*b.manifest["files"], "manifest.json", SIGNATURE])  # no temp file left


def test_re_signing_with_a_new_key_replaces_the_signature(bundle, keys, tmp_path):
    old_private, old_public, old_id = keys
    new_private, new_public, new_id = keygen(tmp_path / "keys" / "next")
    sign_bundle(bundle, old_private)
    sign_bundle(bundle, new_private)
    assert verify_signature(bundle, [old_public, new_public]) == new_id
    with pytest.raises(BundleError, match=f"signed by unknown key {new_id}"):
        verify_signature(bundle, old_public)


def test_sign_refuses_a_tampered_bundle_and_writes_nothing(bundle, keys):
    with open(bundle / "model.onnx", "r+b") as f:
        f.write(b"\x00\x00")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        sign_bundle(bundle, keys[0])
    assert not (bundle / SIGNATURE).exists()


def test_sign_refuses_unlisted_files(bundle, keys):
    (bundle / "notes.txt").write_text("x")
    with pytest.raises(BundleError, match="'notes.txt' not listed in manifest.json"):
        sign_bundle(bundle, keys[0])
    assert not (bundle / SIGNATURE).exists()


def test_sign_warns_about_a_private_key_readable_by_others(bundle, keys, capsys):
    os.chmod(keys[0], 0o644)
    assert _cli(["sign", str(bundle), "--key", str(keys[0])]) == 0
    assert "readable by others" in capsys.readouterr().err


# --- private key forms ----------------------------------------------------------------------


def test_private_keys_in_openssh_and_raw_form_sign_too(bundle, tmp_path):
    key = Ed25519PrivateKey.generate()
    ssh = tmp_path / "id_ed25519"
    ssh.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()))
    raw = tmp_path / "seed"
    raw.write_bytes(key.private_bytes_raw())
    public = key.public_key().public_bytes_raw()
    for path in (ssh, raw):
        sign_bundle(bundle, path)
        assert load_bundle(bundle, public_keys=[public]).signed_by


@pytest.mark.parametrize("make, message", [
    (lambda: b"nonsense", "not a key"),
    (lambda: Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")), "is encrypted"),
    (lambda: b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "cannot parse"),
])
def test_bad_private_keys_get_a_clear_error(tmp_path, make, message):
    path = tmp_path / "k.key"
    path.write_bytes(make())
    with pytest.raises(ConfigError, match=message):
        load_private_key(path)


def test_a_missing_private_key(tmp_path, bundle):
    with pytest.raises(ConfigError, match=r"nope\.key: cannot read"):
        sign_bundle(bundle, tmp_path / "nope.key")
