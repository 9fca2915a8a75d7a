"""Model bundles: the manifest schema and the loader (the device is the consumer).

A bundle is a directory::

    BUNDLE/
      manifest.json   format_version, input spec, normalization, classes, arch,
                      sha256 of every file, versions, training metrics
      model.onnx      raw window -> class logits (normalization baked into the graph)

The loader checks ``format_version``, the manifest's fields and the sha256 of every
file it lists before anything else reads those files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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

    def file(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.path}: bundle has no file {name!r}")
        return self.path / name


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
    _require(rate is None or (isinstance(rate, int | float) and rate > 0), path,
             f"input.sample_rate_hz={rate!r}, expected a positive number")
    return InputSpec(tuple(shape), channels, None if rate is None else float(rate))


def load_bundle(path: str | Path) -> Bundle:
    """Load a bundle directory, verifying its manifest and every file's sha256."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle directory")
    if not mpath.is_file():
        raise BundleError(f"{path}: missing {MANIFEST}")
    raw = mpath.read_bytes()
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath}: {len(raw)} bytes exceeds {MAX_MANIFEST_BYTES}")
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc})") from None
    _require(isinstance(manifest, dict), path, "must be a JSON object")
    version = manifest.get("format_version")
    _require(version == FORMAT_VERSION, path,
             f"format_version={version!r}, this agent reads {FORMAT_VERSION}")

    files = manifest.get("files")
    _require(isinstance(files, dict) and files, path, "'files' must map file names to hashes")
    for name, meta in files.items():
        _require(isinstance(name, str) and "/" not in name and "\\" not in name
                 and name not in ("", ".", "..", MANIFEST), path, f"bad file name {name!r}")
        _require(isinstance(meta, dict) and isinstance(meta.get("sha256"), str), path,
                 f"files[{name!r}] lacks a sha256")
        fpath = path / name
        if not fpath.is_file():
            raise BundleError(f"{path}: file {name!r} listed in the manifest is missing")
        digest = sha256_file(fpath)
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
    return Bundle(path, manifest, spec, tuple(classes), hashlib.sha256(raw).hexdigest()[:12])


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> Path:
    """Fill in ``files`` (sha256 and size of every non-manifest file) and write the manifest."""
    files = {}
    for f in sorted(bundle_dir.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest = {**manifest, "format_version": FORMAT_VERSION, "files": files}
    out = bundle_dir / MANIFEST
    out.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out
