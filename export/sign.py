"""``reverie export keygen`` and ``reverie export sign``: the offline half of bundle signing.

The signature format and its check belong to the device (agent/signing.py); this module
makes key pairs and signs bundles. ``export/cli.py`` imports it to build the parser, so
importing it stays cheap: cryptography loads only inside the functions that use it.

    from export.sign import keygen, sign_bundle
    private, public, key_id = keygen("keys/release")   # keys/release.key, keys/release.pub
    sign_bundle("bundles/har", private)                  # writes bundles/har/manifest.sig
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import stat
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.bundle import MANIFEST, SIGNATURE, load_bundle, unlisted_files
from agent.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.signing import PublicKey, Signature

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
DEFAULT_KEY_NAME = "signing"
MAX_KEY_FILE_BYTES = 16384


def key_paths(out: str | Path) -> tuple[Path, Path]:
    """``(private, public)`` for ``keygen --out``: a directory gets ``signing.key`` and
    ``signing.pub``; a prefix P gets ``P.key`` and ``P.pub`` (a ``.key``/``.pub`` suffix on
    P is dropped, so ``--out keys/release.key`` works too)."""
    raw = str(out)
    out = Path(out)
    if out.is_dir() or raw.endswith(("/", os.sep)):
        prefix = out / DEFAULT_KEY_NAME
    elif out.suffix in (PRIVATE_SUFFIX, PUBLIC_SUFFIX):
        prefix = out.with_suffix("")
    else:
        prefix = out
    return (prefix.parent / (prefix.name + PRIVATE_SUFFIX),
            prefix.parent / (prefix.name + PUBLIC_SUFFIX))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite a key, even one that appeared after the existence check.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widened
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def keygen(out: str | Path) -> tuple[Path, Path, str]:
    """Write a new ed25519 key pair; return ``(private_path, public_path, key_id)``.

    The private key is unencrypted PKCS#8 PEM with mode 0600; the public key is PEM
    (SubjectPublicKeyInfo). Refuses to overwrite either file.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.signing import key_id_of

    private_path, public_path = key_paths(out)
    for p in (private_path, public_path):
        if p.exists() or p.is_symlink():
            raise ConfigError(f"{p}: already exists; refusing to overwrite a key "
                              "(choose another --out or remove it)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public = key.public_key()
    public_pem = public.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)
    raw_public = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_new(private_path, private_pem, 0o600)
    except FileExistsError:
        raise ConfigError(f"{private_path}: already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise ConfigError(f"{private_path}: cannot write the key ({exc.strerror})") from None
    try:
        _write_new(public_path, public_pem, 0o644)
    except OSError as exc:
        private_path.unlink()  # ours, just written: leave no half pair behind
        if isinstance(exc, FileExistsError):
            raise ConfigError(f"{public_path}: already exists; refusing to overwrite a key") from None
        raise ConfigError(f"{public_path}: cannot write the key ({exc.strerror})") from None
    return private_path, public_path, key_id_of(raw_public)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an ed25519 private key: PKCS#8 PEM (what keygen writes), an unencrypted
    OpenSSH private key, or a file of the 32-byte raw seed."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"private key {path}: cannot read ({exc.strerror})") from None
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
            key = serialization.load_ssh_private_key(text, password=None)
        elif text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(text, password=None)
        elif len(data) == 32:
            key = Ed25519PrivateKey.from_private_bytes(data)
        else:
            raise ConfigError(f"private key {path}: not a key; expected PEM "
                              "(-----BEGIN PRIVATE KEY-----), an OpenSSH private key, or a "
                              "32-byte raw seed")
    except TypeError:  # cryptography's word for "needs a password"
        raise ConfigError(f"private key {path}: is encrypted; reverie signs with unencrypted "
                          "keys kept in a 0600 file (decrypt it, e.g. `openssl pkey`)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"private key {path}: cannot parse ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"private key {path}: key type {type(key).__name__}, expected ed25519")
    return key


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sign_bundle(bundle_dir: str | Path, private_key: str | Path) -> Signature:
    """Sign ``bundle_dir``'s manifest.json with the key at ``private_key``; write
    ``manifest.sig`` atomically (replacing an older signature) and return it.

    The bundle must load (every hash matches) and hold only the files its manifest
    lists, as a device configured with the public key will insist. manifest.json itself
    is not touched, so the bundle id stays the same.
    """
    from cryptography.hazmat.primitives import serialization

    from agent.signing import PublicKey, Signature

    bundle_dir = Path(bundle_dir)
    key = load_private_key(private_key)
    raw_public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    public = PublicKey(raw_public, f"{private_key} (public half)")
    bundle = load_bundle(bundle_dir)
    extra = unlisted_files(bundle_dir, bundle.manifest["files"])
    if extra:
        raise BundleError(f"{bundle_dir}: {', '.join(map(repr, extra))} not listed in "
                          f"{MANIFEST}; a device that checks signatures refuses such a bundle. "
                          "Remove them, or re-export the bundle")
    manifest_bytes = (bundle_dir / MANIFEST).read_bytes()
    manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    if manifest_sha256 != bundle.manifest_sha256:
        raise BundleError(f"{bundle_dir / MANIFEST}: changed while being signed; try again")
    sig = Signature(public.key_id, manifest_sha256, key.sign(manifest_bytes))
    _write_atomic(bundle_dir / SIGNATURE, sig.to_bytes())
    load_bundle(bundle_dir, public_keys=[public])  # what a device will do, before we say OK
    return sig


def verify_signature(bundle_dir: str | Path,
                     public_keys: str | Path | Iterable[str | Path | PublicKey]) -> str:
    """Load ``bundle_dir`` as a device configured with ``public_keys`` would (hashes,
    signature, no unlisted files); return the id of the key that signed it."""
    if isinstance(public_keys, str | Path):
        public_keys = [public_keys]
    bundle = load_bundle(bundle_dir, public_keys=list(public_keys))
    if bundle.signed_by is None:
        raise ConfigError("no public key given to verify the signature with")
    return bundle.signed_by


# --- CLI -------------------------------------------------------------------------------


def register_keygen(export_sub: argparse._SubParsersAction) -> None:
    """Add ``keygen`` to the subparsers of the ``reverie export`` group."""
    k = export_sub.add_parser(
        "keygen", help="make an ed25519 key pair for signing bundles",
        description="Write an ed25519 key pair: PREFIX.key (private, PEM, mode 0600; keep it "
                    "off devices) and PREFIX.pub (public, PEM; give it to devices with "
                    "`reverie run --public-key`). Never overwrites a key.")
    # A str, not a Path: Path drops the trailing "/" that marks a directory to create.
    k.add_argument("--out", required=True, metavar="KEYDIR/|PREFIX",
                   help="a directory (existing, or ending in /) gets signing.key and "
                   "signing.pub; else PREFIX.key and PREFIX.pub")
    k.set_defaults(func=_keygen)


def register_sign(export_sub: argparse._SubParsersAction) -> None:
    """Add ``sign`` to the subparsers of the ``reverie export`` group."""
    s = export_sub.add_parser(
        "sign", help="sign a bundle's manifest with an ed25519 private key",
        description="Check the bundle's hashes, then write BUNDLE/manifest.sig: an ed25519 "
                    "signature of manifest.json, which lists every file's sha256. "
                    "manifest.json is unchanged, so the bundle id stays the same.")
    s.add_argument("bundle", type=Path, metavar="BUNDLE/")
    s.add_argument("--key", type=Path, required=True, metavar="PRIVATE",
                   help="private key file (from `reverie export keygen`)")
    s.set_defaults(func=_sign)


def _keygen(args: argparse.Namespace) -> int:
    private_path, public_path, key_id = keygen(args.out)
    print(f"wrote {private_path} (private, mode 0600: keep it secret, off devices)")
    print(f"wrote {public_path} (public, key id {key_id}): "
          f"reverie run --public-key {public_path}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    mode = args.key.stat().st_mode if args.key.exists() else 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"reverie export sign: warning: {args.key} is readable by others "
              f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it", file=sys.stderr)
    sig = sign_bundle(args.bundle, args.key)
    print(f"signed {args.bundle} (bundle id {sig.manifest_sha256[:12]}) with key {sig.key_id}: "
          f"wrote {args.bundle / SIGNATURE}")
    return 0
