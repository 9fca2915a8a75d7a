"""Model bundles: the manifest schema and the loader (the device is the consumer).

A bundle is a directory::

    BUNDLE/
      manifest.json   format_version, input spec, normalization, classes, arch,
                      sha256 of every file, versions, training metrics
      model.onnx      raw window -> class logits (normalization baked into the graph)
      manifest.sig    optional detached ed25519 signature of manifest.json (agent/signing.py);
                      never listed in ``files``

The loader checks ``format_version``, the manifest's fields and the sha256 of every
file it lists before anything else reads those files.

Signatures: when the caller configures trusted public keys, the bundle must carry a
``manifest.sig`` that verifies over the manifest's bytes (strict mode), and must hold no
file the manifest does not list. Without keys the signature is not checked, and an
unlisted file only logs a warning: nothing reads it (``Bundle.file`` refuses unlisted
names), but it should not be there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import BundleError
from agent.persist import fsio

if TYPE_CHECKING:
    from agent.signing import PublicKey

log = logging.getLogger("reverie.bundle")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file (`agent.persist.fsio.sha256_file` without the size)."""
    return fsio.sha256_file(path)[0]


@dataclass(frozen=True)
class InputSpec:
    """What one model input looks like: ``shape`` excludes the batch axis.

    ``(C, T)`` for windows of T samples of C channels; ``(F,)`` for feature vectors,
    which arrive on the wire as one sample of F channels.
    """

    shape: tuple[int, ...]
    channels: tuple[str, ...] | None = None
    sample_rate_hz: float | None = None

    @property
    def n_channels(self) -> int:
        return self.shape[0]

    @property
    def window_samples(self) -> int:
        return self.shape[1] if len(self.shape) == 2 else 1


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]
    input: InputSpec
    classes: tuple[str, ...]
    bundle_id: str  # first 12 hex digits of the manifest's sha256
    manifest_sha256: str = ""
    signed_by: str | None = None  # key id whose signature verified; None when not checked
    # The bytes of every listed file as read and hashed by `load_bundle`: the runtime builds
    # its sessions and arrays from these, never from a second read of the file (which could
    # have been swapped since).
    blobs: Mapping[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    def file(self, name: str) -> Path:
        """The path of a listed file (for tools; the runtime reads `data`)."""
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.path}: bundle has no file {name!r}")
        return self.path / name

    def data(self, name: str) -> bytes:
        """The verified bytes of a listed file (read and hashed once, at load)."""
        self.file(name)
        try:
            return self.blobs[name]
        except KeyError:
            raise BundleError(f"{self.path}: {name!r} was not loaded with the bundle "
                              "(use load_bundle)") from None


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise BundleError(f"{path / MANIFEST}: {what}")


def _parse_input(raw: Any, path: Path) -> InputSpec:
    _require(isinstance(raw, dict), path, "'input' must be an object")
    shape = raw.get("shape")
    _require(isinstance(shape, list) and len(shape) in (1, 2)
             and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape),
             path, f"input.shape={shape!r}, expected [C, T] or [F] of positive ints")
    channels = raw.get("channels")
    if channels is not None:
        _require(isinstance(channels, list) and len(channels) == shape[0]
                 and all(isinstance(c, str) for c in channels),
                 path, f"input.channels must list {shape[0]} names")
        channels = tuple(channels)
    rate = raw.get("sample_rate_hz")
    _require(rate is None or (isinstance(rate, int | float) and not isinstance(rate, bool)
                              and math.isfinite(rate) and rate > 0), path,
             f"input.sample_rate_hz={rate!r}, expected a positive finite number")
    return InputSpec(tuple(shape), channels, None if rate is None else float(rate))


def load_bundle(path: str | Path, *,
                public_keys: Iterable[PublicKey | str | Path | bytes] | None = None) -> Bundle:
    """Load a bundle directory, verifying its manifest and every file's sha256.

    With ``public_keys`` (trusted ed25519 keys: any one of them may have signed, which
    is how keys rotate; paths, key bytes or `agent.signing.PublicKey`), the bundle must
    also be signed by one of them and contain only the files its manifest lists. The
    manifest is read once: the bytes whose signature is checked are the bytes parsed.
    ``None`` or an empty list: no key is configured, the signature is not checked.

    >>> b = load_bundle("bundles/har", public_keys=["release.pub"])  # doctest: +SKIP
    >>> b.signed_by                                                  # doctest: +SKIP
    '3f9c0a1b2d4e5f60'
    """
    keys: tuple[PublicKey, ...] = ()
    if public_keys is not None:
        from agent import signing  # cryptography loads only for signed-bundle checks

        keys = signing.load_public_keys(public_keys)
    path = Path(path)
    mpath = path / MANIFEST
    if not path.exists():
        raise BundleError(f"{path}: does not exist (expected a bundle directory from "
                          "`reverie export train`)")
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle directory")
    if not mpath.is_file():
        raise BundleError(f"{path}: missing {MANIFEST}")
    try:    # the size first: a huge manifest is refused without being read
        size = mpath.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{mpath}: {size} bytes exceeds {MAX_MANIFEST_BYTES}")
        with open(mpath, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise BundleError(f"{mpath}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_MANIFEST_BYTES:     # grew since the stat
        raise BundleError(f"{mpath}: more than {MAX_MANIFEST_BYTES} bytes")
    signed_by = signing.verify_manifest(raw, path / SIGNATURE, keys) if keys else None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting
        raise BundleError(f"{mpath}: not valid JSON ({exc})") from None
    _require(isinstance(manifest, dict), path, "must be a JSON object")
    version = manifest.get("format_version")
    _require(version == FORMAT_VERSION and not isinstance(version, bool), path,
             f"format_version={version!r}, this agent reads {FORMAT_VERSION}")

    files = manifest.get("files")
    _require(isinstance(files, dict) and files, path, "'files' must map file names to hashes")
    for name, meta in files.items():
        _require(isinstance(name, str) and "/" not in name and "\\" not in name
                 and name not in ("", ".", "..", MANIFEST, SIGNATURE), path,
                 f"bad file name {name!r}")
        _require(isinstance(meta, dict) and isinstance(meta.get("sha256"), str), path,
                 f"files[{name!r}] lacks a sha256")
    _check_unlisted(path, files, strict=bool(keys))
    blobs: dict[str, bytes] = {}
    for name, meta in files.items():
        fpath = path / name
        if not fpath.is_file():
            raise BundleError(f"{path}: file {name!r} listed in the manifest is missing")
        try:
            blobs[name] = fpath.read_bytes()
        except OSError as exc:
            raise BundleError(f"{fpath}: cannot read ({exc.strerror or exc})") from None
        digest = hashlib.sha256(blobs[name]).hexdigest()
        if digest != meta["sha256"]:
            raise BundleError(
                f"{fpath}: sha256 mismatch (manifest {meta['sha256'][:12]}..., file {digest[:12]}...):"
                " the bundle was modified or corrupted")
    _require("model.onnx" in files, path, "bundle lists no model.onnx")

    spec = _parse_input(manifest.get("input"), path)
    classes = manifest.get("classes")
    _require(isinstance(classes, list) and len(classes) >= 2
             and all(isinstance(c, str) and c for c in classes)
             and len(set(classes)) == len(classes), path,
             f"classes={classes!r}, expected >= 2 distinct non-empty strings")
    manifest_sha256 = hashlib.sha256(raw).hexdigest()
    return Bundle(path, manifest, spec, tuple(classes), manifest_sha256[:12], manifest_sha256,
                  signed_by, blobs)


def unlisted_files(path: Path, files: dict[str, Any]) -> list[str]:
    """Names in the bundle directory that are neither listed in ``files`` nor the manifest
    or its signature."""
    try:
        names = [p.name for p in path.iterdir()]
    except OSError as exc:
        raise BundleError(f"{path}: cannot list ({exc.strerror or exc})") from None
    return sorted(n for n in names if n not in files and n not in (MANIFEST, SIGNATURE))


def _check_unlisted(path: Path, files: dict[str, Any], strict: bool) -> None:
    unlisted = unlisted_files(path, files)
    if not unlisted:
        return
    names = ", ".join(map(repr, unlisted[:5])) + (", ..." if len(unlisted) > 5 else "")
    if strict:
        raise BundleError(f"{path}: {names} not listed in {MANIFEST}; "
                          "a bundle checked against a public key may hold only the files its "
                          f"manifest lists (and {SIGNATURE})")
    log.warning("%s: ignoring %s, not listed in %s", path, names, MANIFEST)


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> Path:
    """Fill in ``files`` (sha256 and size of every file but the manifest and its signature)
    and write the manifest. A ``manifest.sig`` already there no longer verifies after this."""
    files = {}
    for f in sorted(bundle_dir.iterdir()):
        if f.is_file() and f.name not in (MANIFEST, SIGNATURE):
            digest, size = fsio.sha256_file(f)
            files[f.name] = {"sha256": digest, "bytes": size}
    manifest = {**manifest, "format_version": FORMAT_VERSION, "files": files}
    out = bundle_dir / MANIFEST
    out.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out
