"""``reverie export quantize``: an int8 copy of a bundle, with its accuracy cost measured first.

    report = quantize_bundle("bundles/har", "har.npz")        # writes bundles/har-int8
    print("\\n".join(report.lines()))

Two candidates are built from the encoder (after onnxruntime's ``quant_pre_process``):

* ``static``: QDQ format, int8 activations and weights, per-channel weights in a 7-bit
  range (``reduce_range``: see `export.int8`), MinMax ranges from the calibration
  dataset's *train* windows of the bundle's classes;
* ``dynamic``: int8 per-channel weights of MatMul/Gemm, activations quantized at run
  time. Only when the encoder has MatMul/Gemm (the mlp's dense layers): for convolutions
  it would emit ConvInteger, which onnxruntime ran 1.2-3x *slower* than fp32 here.

Each is scored end to end (int8 encoder + the bundle's numpy head, `agent.head.Head`) on
the calibration dataset's *test* split, bundle classes only, and timed per window (one
thread, batch 1, the device's session settings) interleaved with the fp32 encoder (see
`agent.bench.timing`). The fastest candidate whose accuracy drop is within ``max_drop``
points wins; if none is, `QuantizeError` (nothing written) unless ``force``, which
writes the most accurate one.

The new bundle (default ``<BUNDLE>-int8``, written atomically like `export.onnx_export`):
``encoder.onnx`` is the int8 encoder, so the device needs no special case; ``model.onnx``
is that int8 encoder followed by the head as fp32 Gemm layers built from ``head.npz``, so
it computes what the device computes (the head stays fp32: the device runs and adapts it
in numpy). ``head.npz``, ``weights.npz`` (the fp32 torch weights verify compares with),
``exemplars.npz`` (fp32 latents) and ``sae.npz`` are copied; ``manifest.sig`` is not (the
manifest changed: re-sign). The manifest gains a ``quantization`` section.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from agent.bench.timing import interleaved_times, summary
from agent.bundle import SIGNATURE, Bundle, load_bundle, write_manifest
from agent.errors import BundleError, ConfigError
from agent.head import Head
from agent.inference import make_session
from export.errors import QuantizeError
from export.int8 import (
    DESCRIPTIONS,
    METHODS,
    Calibration,
    accuracy_pct,
    batch1,
    build_candidates,
    encode_all,
    load_calibration,
    with_head,
)

ENCODER = "encoder.onnx"
MODEL = "model.onnx"
HEAD = "head.npz"
DEFAULT_MAX_DROP = 1.0
DEFAULT_ITERATIONS = 1000


def default_output(bundle_dir: str | Path) -> Path:
    """``bundles/har`` (or ``bundles/har/``) -> ``bundles/har-int8``."""
    p = Path(bundle_dir).absolute()
    return p.parent / f"{p.name}-int8"


@dataclass
class Variant:
    """One encoder: fp32, or an int8 candidate, with what was measured about it."""

    method: str                      # "fp32" | "static" | "dynamic"
    path: Path | None = None
    status: str = "ok"               # or why it was skipped / failed
    accuracy: float | None = None    # % on the test split, with the numpy head
    drop: float | None = None        # points vs fp32
    latency: dict[str, float] = field(default_factory=dict)
    latent_rel_error: float | None = None  # mean |z - z_fp32| / |z_fp32| per window

    @property
    def label(self) -> str:
        return "fp32 (source)" if self.method == "fp32" else DESCRIPTIONS[self.method]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "status": self.status, "accuracy_pct": self.accuracy,
                "drop_points": self.drop, "latency_us": self.latency or None,
                "latent_rel_error": self.latent_rel_error}


def measure(encoder_path: Path, candidates: dict[str, Path | str], head: Head,
            cal: Calibration, iterations: int) -> list[Variant]:
    """Accuracy of every encoder on ``cal``'s test split, then their latencies in one
    interleaved run; the fp32 encoder first."""
    variants = [Variant("fp32", encoder_path)]
    variants += [Variant(m, p) if isinstance(p, Path) else Variant(m, None, p)
                 for m, p in candidates.items()]
    sessions, Z_ref = {}, None
    for v in variants:
        if v.path is None:
            continue
        s = make_session(v.path)
        Z = encode_all(s, cal.X_test)
        v.accuracy = accuracy_pct(head, Z, cal.y_test)
        if Z_ref is None:
            Z_ref = Z
        else:
            v.drop = round(variants[0].accuracy - v.accuracy, 2)
            norm = np.maximum(np.linalg.norm(Z_ref, axis=1), 1e-12)
            v.latent_rel_error = round(float(np.mean(np.linalg.norm(Z - Z_ref, axis=1) / norm)), 5)
        sessions[v.method] = batch1(s)
    times = interleaved_times(sessions, cal.X_test, iterations)
    for v in variants:
        if v.method in times:
            v.latency = summary(times[v.method])
    return variants


def choose(variants: list[Variant], max_drop: float, force: bool) -> Variant:
    """The fastest int8 variant within ``max_drop``; else QuantizeError, or with ``force``
    the most accurate one."""
    built = [v for v in variants[1:] if v.status == "ok"]
    if not built:
        reasons = "; ".join(f"{v.method}: {v.status}" for v in variants[1:])
        raise QuantizeError(f"no int8 encoder could be built ({reasons})")
    within = [v for v in built if v.drop <= max_drop]
    if within:
        return min(within, key=lambda v: v.latency["p50_us"])
    best = min(built, key=lambda v: (v.drop, v.latency["p50_us"]))
    if force:
        return best
    fp32 = variants[0]
    each = ", ".join(f"{v.method} {v.accuracy:.2f}%" for v in built)
    raise QuantizeError(f"int8 accuracy drop {best.drop:.2f} points exceeds --max-drop "
                        f"{max_drop:g} (fp32 {fp32.accuracy:.2f}% -> {each}); nothing written "
                        "(--force writes the most accurate one anyway)")


# ---------------------------------------------------------------------- the command

@dataclass
class QuantizeReport:
    """What `quantize_bundle` measured and wrote; ``section`` is the manifest's
    ``quantization`` section."""

    out: Path
    bundle_id: str
    variants: list[Variant]
    chosen: Variant
    section: dict[str, Any]

    def lines(self) -> list[str]:
        q, fp32, chosen = self.section, self.variants[0], self.chosen
        c, src, size = q["calibration"], q["source_bundle"], q["encoder_bytes"]
        w = max(len(v.label) for v in self.variants)
        out = [f"quantized {src['name']} (id {src['id']}) -> {self.out} (id {self.bundle_id})",
               f"  calibration {c['file']} (sha256 {c['sha256'][:12]}..., {c['bytes']} bytes): "
               f"{c['rows']} train windows; accuracy on {q['evaluation']['rows']} test windows "
               f"of {len(c['classes'])} classes (int8 encoder + numpy head); latency per "
               "window, 1 thread, batch 1, interleaved",
               f"  {'encoder':{w}s} {'accuracy':>9s} {'drop':>6s} {'p50 us':>8s} {'p99 us':>8s}"]
        for v in self.variants:
            if v.status != "ok":
                out.append(f"  {v.label:{w}s} {v.status}")
                continue
            drop = "-" if v.drop is None else f"{v.drop:.2f}"
            mark = "  <- written" if v is chosen else ""
            out.append(f"  {v.label:{w}s} {v.accuracy:8.2f}% {drop:>6s} "
                       f"{v.latency['p50_us']:8.1f} {v.latency['p99_us']:8.1f}{mark}")
        why = ("FORCED: its accuracy drop exceeds --max-drop" if q["forced"]
               else f"the fastest p50 within --max-drop {q['max_drop_points']:g} points")
        out.append(f"  wrote {chosen.method} ({why}): p50 {fp32.latency['p50_us']:.1f} -> "
                   f"{chosen.latency['p50_us']:.1f} us, encoder.onnx {size['before']} -> "
                   f"{size['after']} bytes")
        if chosen.latency["p50_us"] >= fp32.latency["p50_us"]:
            out.append("  note: int8 is not faster than fp32 here; the fp32 bundle may be the "
                       "better choice for this model")
        if src["signed"]:
            out.append(f"  note: the source bundle is signed; {SIGNATURE} was not copied (the "
                       f"manifest changed): re-sign with `reverie export sign {self.out} --key K`")
        return out


def _section(bundle: Bundle, cal: Calibration, variants: list[Variant], chosen: Variant,
             max_drop: float, iterations: int, int8_bytes: int) -> dict[str, Any]:
    """The manifest's ``quantization`` section."""
    import onnxruntime

    fp32 = variants[0]
    return {
        "method": chosen.method,
        "description": DESCRIPTIONS[chosen.method],
        "format": "QDQ" if chosen.method == "static" else "integer ops (MatMulInteger)",
        "per_channel": True,
        "reduce_range": chosen.method == "static",  # 7-bit weights: see export.int8
        "weight_type": "int8",
        "activation_type": "int8" if chosen.method == "static" else "uint8, per call",
        "calibration": cal.info(),
        "evaluation": {"split": "test", "rows": len(cal.X_test),
                       "what": "int8 encoder.onnx + numpy head.npz, bundle classes only"},
        "accuracy_pct": {"before": fp32.accuracy, "after": chosen.accuracy,
                         "drop_points": chosen.drop},
        "latency_us": {"before": fp32.latency, "after": chosen.latency, "threads": 1,
                       "batch": 1, "iterations": iterations, "what": "encoder.onnx per window"},
        "latent_rel_error": chosen.latent_rel_error,
        "candidates": [v.to_dict() for v in variants[1:]],
        "max_drop_points": max_drop,
        "forced": bool(chosen.drop > max_drop),
        "encoder_bytes": {"before": bundle.file(ENCODER).stat().st_size, "after": int8_bytes},
        "source_bundle": {"id": bundle.bundle_id, "name": bundle.manifest.get("name"),
                          "created": bundle.manifest.get("created"),
                          "signed": (bundle.path / SIGNATURE).exists()},
        "model_onnx": "int8 encoder.onnx + head.npz as fp32 Gemm layers",
        "exemplars": "fp32 latents of the source bundle (copied)",
        "versions": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__},
    }


def _check_source(bundle: Bundle) -> None:
    m = bundle.manifest
    if "quantization" in m:
        src = (m["quantization"].get("source_bundle") or {}).get("id", "?")
        raise BundleError(f"{bundle.path}: already quantized ({m['quantization'].get('method')}"
                          f"); quantize its fp32 source bundle (id {src}) instead")
    enc = m.get("encoder")
    if not isinstance(enc, dict) or enc.get("file") != ENCODER:
        raise BundleError(f"{bundle.path}: the manifest has no 'encoder' section naming "
                          f"{ENCODER} (a bundle from before the encoder/head split?)")
    if enc.get("input_name") != (m.get("onnx") or {}).get("input_name"):
        raise BundleError(f"{bundle.path}: encoder and model inputs are named differently")


def quantize_bundle(bundle_dir: str | Path, calibration: str | Path,
                    out_dir: str | Path | None = None, *, max_drop: float = DEFAULT_MAX_DROP,
                    force: bool = False, overwrite: bool = False,
                    iterations: int = DEFAULT_ITERATIONS,
                    methods: tuple[str, ...] = METHODS) -> QuantizeReport:
    """Write an int8 copy of the bundle at ``bundle_dir`` to ``out_dir`` (default
    ``<bundle_dir>-int8``); see the module docstring. ``overwrite`` replaces an existing
    bundle at ``out_dir``. Raises QuantizeError (accuracy), BundleError, DatasetError,
    ConfigError; on any error nothing is left at ``out_dir``."""
    from export.onnx_export import check_output_dir, fsync_path, move_into_place
    from export.verify import verify_bundle

    if not np.isfinite(max_drop):
        raise ConfigError(f"--max-drop {max_drop}, expected a number of accuracy points")
    if iterations < 1:
        raise ConfigError(f"--iterations {iterations}, expected >= 1")
    bundle = load_bundle(bundle_dir)
    _check_source(bundle)
    m = bundle.manifest
    out = Path(out_dir).absolute() if out_dir is not None else default_output(bundle.path)
    if out.resolve() == bundle.path.resolve():
        raise ConfigError(f"--out {out}: is the source bundle; choose another directory")
    check_output_dir(out, overwrite, "--overwrite")  # fail before the slow part
    seed = int(((m.get("training") or {}).get("config") or {}).get("seed", 0))
    cal = load_calibration(bundle, calibration, seed=seed)
    head = Head.from_npz(bundle.file(HEAD), m)

    with tempfile.TemporaryDirectory(prefix="reverie-quantize-") as tmp:
        candidates = build_candidates(bundle.file(ENCODER), cal.X_cal, Path(tmp), methods)
        variants = measure(bundle.file(ENCODER), candidates, head, cal, iterations)
        chosen = choose(variants, max_drop, force)
        encoder_q = onnx.load(str(chosen.path))
        section = _section(bundle, cal, variants, chosen, max_drop, iterations,
                           chosen.path.stat().st_size)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700
    except OSError as exc:
        raise BundleError(f"{out}: cannot create the bundle directory ({exc})") from None
    try:
        onnx.save(encoder_q, str(staging / ENCODER))
        onnx.save(with_head(encoder_q, head, m["encoder"]["output_name"],
                            m["onnx"]["output_name"]), str(staging / MODEL))
        for name in m["files"]:
            if name not in (ENCODER, MODEL):  # manifest.sig is never listed: not copied
                shutil.copyfile(bundle.file(name), staging / name)
        manifest = {k: v for k, v in m.items() if k not in ("files", "format_version")}
        manifest["name"] = out.name
        manifest["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        manifest["quantization"] = section
        write_manifest(staging, manifest)
        for f in staging.iterdir():
            fsync_path(f)
        verify_bundle(staging, seed=seed)
        move_into_place(staging, out, overwrite, "--overwrite")
    except OSError as exc:
        raise BundleError(f"{out}: cannot write the bundle ({exc})") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return QuantizeReport(out, load_bundle(out).bundle_id, variants, chosen, section)
