"""agent.signing: key files, the manifest.sig format, and verify_manifest on its own."""

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import BundleError, ConfigError
from agent.signing import (
    PublicKey,
    Signature,
    key_id_of,
    load_public_key,
    load_public_keys,
    verify_manifest,
)

MANIFEST = json.dumps({"format_version": 1, "files": {"model.onnx": {"sha256": "ab" * 32}}},
                      indent=2, sort_keys=True).encode() + b"\n"


def _seeded_key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"key%d" % seed).digest())


def _public(key: Ed25519PrivateKey) -> PublicKey:
    return PublicKey(key.public_key().public_bytes_raw(), "test")


def _sign(manifest: bytes, key: Ed25519PrivateKey) -> bytes:
    return Signature(_public(key).key_id, hashlib.sha256(manifest).hexdigest(),
                     key.sign(manifest)).to_bytes()


KEY_A, KEY_B = _seeded_key(1), _seeded_key(2)
SIG_A = _sign(MANIFEST, KEY_A)


# --- keys ---------------------------------------------------------------------------------


def test_key_id_is_16_hex_of_the_raw_key_hash():
    raw = KEY_A.public_key().public_bytes_raw()
    assert key_id_of(raw) == hashlib.sha256(raw).hexdigest()[:16] == _public(KEY_A).key_id


@pytest.mark.parametrize("form", ["pem", "openssh", "raw"])
def test_public_key_forms_load_to_the_same_key(tmp_path, form):
    pub = KEY_A.public_key()
    data = {
        "pem": pub.public_bytes(serialization.Encoding.PEM,
                                serialization.PublicFormat.SubjectPublicKeyInfo),
        "openssh": pub.public_bytes(serialization.Encoding.OpenSSH,
                                    serialization.PublicFormat.OpenSSH) + b" me@host\n",
        "raw": pub.public_bytes_raw(),
    }[form]
    path = tmp_path / "k.pub"
    path.write_bytes(data)
    assert load_public_key(path).raw == load_public_key(data).raw == pub.public_bytes_raw()
    assert load_public_key(str(path)).source == str(path)


def test_a_private_key_is_refused_as_public_key(tmp_path):
    pem = KEY_A.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    with pytest.raises(ConfigError, match="is a private key; configure the public key"):
        load_public_key(pem)


def test_a_non_ed25519_key_is_refused_naming_its_type():
    pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ConfigError, match=r"key type \w+, expected ed25519"):
        load_public_key(pem)


@pytest.mark.parametrize("data, message", [
    (b"hello", "not a key; expected PEM"),
    (b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", "cannot parse"),
    (b"ssh-ed25519 !!!", "cannot parse"),
    (b"x" * 20000, "not a key"),
])
def test_garbage_public_keys_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        load_public_key(data)


def test_missing_or_oversized_key_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.pub: cannot read"):
        load_public_key(tmp_path / "nope.pub")
    (tmp_path / "big").write_bytes(b"x" * 20000)
    with pytest.raises(ConfigError, match="not a key file"):
        load_public_key(tmp_path / "big")


def test_load_public_keys_drops_duplicates_and_passes_keys_through():
    a, b = _public(KEY_A), _public(KEY_B)
    assert load_public_keys([a, a.raw, b]) == (a, b)


# --- the manifest.sig format -----------------------------------------------------------------


def test_signature_file_round_trips():
    sig = Signature.from_bytes(SIG_A)
    assert sig.to_bytes() == SIG_A
    assert json.loads(SIG_A)["alg"] == "ed25519" and len(sig.sig) == 64


def _sig_with(**changes) -> bytes:
    body = json.loads(SIG_A)
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


@pytest.mark.parametrize("raw, message", [
    (b"", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "fields"),
    (_sig_with(sig=None), "fields"),
    (_sig_with(extra=1), "fields"),
    (_sig_with(alg="rsa"), "alg='rsa'"),
    (_sig_with(format_version=2), "format_version=2"),
    (_sig_with(format_version=True), "format_version=True"),
    (_sig_with(key_id="ABCDEF0123456789"), "key_id="),
    (_sig_with(manifest_sha256="00"), "manifest_sha256="),
    (_sig_with(sig="not base64!"), "sig is not base64"),
    (_sig_with(sig=7), "sig is not base64"),
    (_sig_with(sig=base64.b64encode(b"x" * 63).decode()), "canonical base64 of 64 bytes"),
    (b" " * 5000, "exceeds"),
])
def test_damaged_signature_files_get_a_clear_error(raw, message):
    with pytest.raises(BundleError, match=message) as info:
        Signature.from_bytes(raw, "b/manifest.sig")
    assert "b/manifest.sig" in str(info.value) and "damaged" in str(info.value)


def test_non_canonical_base64_is_refused():
    # 64 bytes -> 86 digits + "==": the last digit carries 4 unused bits.
    b64 = json.loads(SIG_A)["sig"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(b64[-3])
    other = b64[:-3] + alphabet[last ^ 1] + "=="
    assert base64.b64decode(other) == base64.b64decode(b64)
    with pytest.raises(BundleError, match="canonical"):
        Signature.from_bytes(_sig_with(sig=other))


# --- verify_manifest ---------------------------------------------------------------------------


@pytest.fixture
def sig_file(tmp_path):
    path = tmp_path / "manifest.sig"
    path.write_bytes(SIG_A)
    return path


def test_a_good_signature_returns_the_key_id(sig_file):
    assert verify_manifest(MANIFEST, sig_file, [_public(KEY_A)]) == _public(KEY_A).key_id


def test_any_trusted_key_may_have_signed(sig_file):
    keys = [_public(KEY_B), _public(KEY_A)]
    assert verify_manifest(MANIFEST, sig_file, keys) == _public(KEY_A).key_id


def test_unknown_signer_is_named(sig_file):
    a, b = _public(KEY_A).key_id, _public(KEY_B).key_id
    with pytest.raises(BundleError, match=f"signed by unknown key {a} \\(trusted: {b}\\)"):
        verify_manifest(MANIFEST, sig_file, [_public(KEY_B)])


def test_missing_signature_says_unsigned(tmp_path):
    with pytest.raises(BundleError, match="bundle is unsigned .* but a public key is configured"):
        verify_manifest(MANIFEST, tmp_path / "manifest.sig", [_public(KEY_A)])


def test_no_keys_is_a_config_error(sig_file):
    with pytest.raises(ConfigError, match="no public key"):
        verify_manifest(MANIFEST, sig_file, [])


def test_forged_signature_for_a_trusted_key_id_does_not_verify(sig_file):
    # An attacker who edits the manifest and fixes up manifest_sha256 still lacks the key.
    edited = MANIFEST.replace(b"ab", b"cd", 1)
    sig_file.write_bytes(Signature(_public(KEY_A).key_id, hashlib.sha256(edited).hexdigest(),
                                   KEY_B.sign(edited)).to_bytes())
    with pytest.raises(BundleError, match=f"does not verify with key {_public(KEY_A).key_id}"):
        verify_manifest(edited, sig_file, [_public(KEY_A)])


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(["manifest", "sig"]), position=st.integers(0, 10**6),
       bit=st.integers(0, 7))
def test_a_single_bit_flip_anywhere_never_verifies(sig_file, target, position, bit):
    data = bytearray(MANIFEST if target == "manifest" else SIG_A)
    data[position % len(data)] ^= 1 << bit
    manifest = bytes(data) if target == "manifest" else MANIFEST
    sig_file.write_bytes(bytes(data) if target == "sig" else SIG_A)
    with pytest.raises(BundleError):
        verify_manifest(manifest, sig_file, [_public(KEY_A), _public(KEY_B)])
