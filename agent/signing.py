"""Bundle signatures: ed25519 over the exact bytes of ``manifest.json`` (the device verifies).

The manifest lists the sha256 of every file, so one signature over its bytes covers the
whole bundle. The signature is detached, in ``manifest.sig`` beside the manifest, and is
never listed in the manifest's ``files`` (that would be circular)::

    {"format_version": 1, "alg": "ed25519", "key_id": "3f9c0a1b2d4e5f60",
     "manifest_sha256": "<64 hex digits>", "sig": "<base64 of the 64-byte signature>"}

``key_id`` is the first 16 hex digits of sha256(the raw 32-byte public key): it names the
key in messages and picks the trusted key to check against, so a device can trust an old
and a new key at once while keys rotate. ``manifest_sha256`` only makes the error precise
("manifest.json was modified after it was signed"); it is checked, never trusted: the
verdict is always the signature's.

Key files (``reverie export keygen`` writes the first form of each):

* public: PEM ``-----BEGIN PUBLIC KEY-----`` (SubjectPublicKeyInfo); also accepted: an
  OpenSSH line ``ssh-ed25519 AAAA... comment``, or a file of exactly 32 raw bytes.
* private (export side only, see export/sign.py): unencrypted PKCS#8 PEM
  ``-----BEGIN PRIVATE KEY-----``, mode 0600.

    >>> keys = load_public_keys(["/etc/reverie/release.pub"])     # doctest: +SKIP
    >>> verify_manifest(manifest_bytes, bundle / "manifest.sig", keys)  # doctest: +SKIP
    '3f9c0a1b2d4e5f60'
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import BundleError, ConfigError

ALG = "ed25519"
SIG_FORMAT_VERSION = 1
KEY_ID_HEX = 16
RAW_KEY_BYTES = 32
SIG_BYTES = 64
MAX_SIGNATURE_FILE_BYTES = 4096
MAX_KEY_FILE_BYTES = 16384
_SIG_FIELDS = {"format_version", "alg", "key_id", "manifest_sha256", "sig"}


def key_id_of(raw_public_key: bytes) -> str:
    """First 16 hex digits of sha256(raw 32-byte public key)."""
    return hashlib.sha256(raw_public_key).hexdigest()[:KEY_ID_HEX]


@dataclass(frozen=True)
class PublicKey:
    """A trusted ed25519 public key; ``source`` says where it came from, for messages."""

    raw: bytes
    source: str = "<bytes>"

    def __post_init__(self) -> None:
        if len(self.raw) != RAW_KEY_BYTES:
            raise ConfigError(f"public key {self.source}: {len(self.raw)} bytes, "
                              f"expected {RAW_KEY_BYTES}")

    @property
    def key_id(self) -> str:
        return key_id_of(self.raw)

    def verifies(self, signature: bytes, data: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            return False
        return True


def _raw(key: object, source: str) -> bytes:
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key {source}: key type {type(key).__name__}, "
                          "expected ed25519")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(source: str | Path | bytes) -> PublicKey:
    """A public key from a file path, or from the key file's contents given as bytes.

    Accepts PEM (``-----BEGIN PUBLIC KEY-----``), an OpenSSH ``ssh-ed25519`` line, or 32
    raw bytes. A private key is refused: the device must only ever hold public keys.
    """
    if isinstance(source, bytes):
        data, where = source, "<bytes>"
    else:
        where = str(source)
        try:
            with open(source, "rb") as f:
                data = f.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"public key {where}: cannot read ({exc.strerror})") from None
        if len(data) > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"public key {where}: larger than {MAX_KEY_FILE_BYTES} bytes, "
                              "not a key file")
    text = data.strip()
    try:
        if b"PRIVATE KEY" in text:
            raise ConfigError(f"public key {where}: is a private key; configure the public "
                              "key (the .pub file) instead")
        if text.startswith(b"-----BEGIN"):
            return PublicKey(_raw(serialization.load_pem_public_key(text), where), where)
        if text.startswith(b"ssh-"):
            return PublicKey(_raw(serialization.load_ssh_public_key(text), where), where)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"public key {where}: cannot parse ({exc})") from None
    if len(data) == RAW_KEY_BYTES:
        return PublicKey(data, where)
    raise ConfigError(f"public key {where}: not a key; expected PEM (-----BEGIN PUBLIC KEY-----), "
                      f"an OpenSSH ssh-ed25519 line, or {RAW_KEY_BYTES} raw bytes")


def load_public_keys(sources: Iterable[PublicKey | str | Path | bytes]) -> tuple[PublicKey, ...]:
    """Load each key (``PublicKey`` objects pass through); duplicates are dropped."""
    keys: dict[str, PublicKey] = {}
    for source in sources:
        key = source if isinstance(source, PublicKey) else load_public_key(source)
        keys.setdefault(key.key_id, key)
    return tuple(keys.values())


@dataclass(frozen=True)
class Signature:
    """The contents of ``manifest.sig``."""

    key_id: str
    manifest_sha256: str
    sig: bytes

    def to_bytes(self) -> bytes:
        body = {"format_version": SIG_FORMAT_VERSION, "alg": ALG, "key_id": self.key_id,
                "manifest_sha256": self.manifest_sha256,
                "sig": base64.b64encode(self.sig).decode("ascii")}
        return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode("ascii")

    @classmethod
    def from_bytes(cls, raw: bytes, where: str | Path = "manifest.sig") -> Signature:
        """Parse strictly: one encoding per signature, so no bit of the file is inert."""
        def bad(what: str) -> BundleError:
            return BundleError(f"{where}: {what}; the signature file is damaged "
                               "(re-sign with `reverie export sign`)")

        if len(raw) > MAX_SIGNATURE_FILE_BYTES:
            raise bad(f"{len(raw)} bytes exceeds {MAX_SIGNATURE_FILE_BYTES}")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise bad(f"not valid JSON ({exc})") from None
        if not isinstance(body, dict) or set(body) != _SIG_FIELDS:
            got = sorted(body) if isinstance(body, dict) else type(body).__name__
            raise bad(f"fields {got}, expected {sorted(_SIG_FIELDS)}")
        version = body["format_version"]
        if type(version) is not int or version != SIG_FORMAT_VERSION:
            raise bad(f"format_version={version!r}, this agent reads {SIG_FORMAT_VERSION}")
        if body["alg"] != ALG:
            raise bad(f"alg={body['alg']!r}, expected {ALG!r}")
        key_id, digest, sig_b64 = body["key_id"], body["manifest_sha256"], body["sig"]
        if not _is_lower_hex(key_id, KEY_ID_HEX):
            raise bad(f"key_id={key_id!r}, expected {KEY_ID_HEX} lowercase hex digits")
        if not _is_lower_hex(digest, 64):
            raise bad(f"manifest_sha256={digest!r}, expected 64 lowercase hex digits")
        try:
            if not isinstance(sig_b64, str):
                raise ValueError
            sig = base64.b64decode(sig_b64, validate=True)
        except (ValueError, binascii.Error):
            raise bad("sig is not base64") from None
        # b64decode ignores the unused low bits of the last digit: insist on the one encoding.
        if len(sig) != SIG_BYTES or base64.b64encode(sig).decode("ascii") != sig_b64:
            raise bad(f"sig is not the canonical base64 of {SIG_BYTES} bytes")
        return cls(key_id, digest, sig)


def _is_lower_hex(value: object, n: int) -> bool:
    return (isinstance(value, str) and len(value) == n
            and all(c in "0123456789abcdef" for c in value))


def read_signature(sig_file: Path) -> Signature | None:
    """The parsed ``manifest.sig``, or None when the bundle has none."""
    try:
        with open(sig_file, "rb") as f:
            raw = f.read(MAX_SIGNATURE_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BundleError(f"{sig_file}: cannot read ({exc.strerror})") from None
    return Signature.from_bytes(raw, sig_file)


def verify_manifest(manifest_bytes: bytes, sig_file: Path,
                    public_keys: Iterable[PublicKey]) -> str:
    """Check ``sig_file`` over ``manifest_bytes`` against any trusted key; return its key id.

    Pass the manifest bytes that will be parsed, not a path: verifying one read and
    parsing another would let the file change in between.
    """
    keys = {k.key_id: k for k in public_keys}
    if not keys:
        raise ConfigError("no public key to verify the bundle signature with")
    trusted = ", ".join(keys)
    sig = read_signature(sig_file)
    if sig is None:
        raise BundleError(f"{sig_file.parent}: bundle is unsigned (no {sig_file.name}) but a "
                          f"public key is configured (trusted: {trusted})")
    key = keys.get(sig.key_id)
    if key is None:
        raise BundleError(f"{sig_file}: signed by unknown key {sig.key_id} (trusted: {trusted})")
    actual = hashlib.sha256(manifest_bytes).hexdigest()
    if actual != sig.manifest_sha256:
        raise BundleError(
            f"{sig_file}: signature does not verify with key {sig.key_id}: manifest.json was "
            f"modified after it was signed (signed sha256 {sig.manifest_sha256[:12]}..., "
            f"now {actual[:12]}...)")
    if not key.verifies(sig.sig, manifest_bytes):
        raise BundleError(f"{sig_file}: signature does not verify with key {sig.key_id} "
                          f"({key.source}): the manifest or its signature was tampered with")
    return sig.key_id
