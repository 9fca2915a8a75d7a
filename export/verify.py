"""Check a bundle end to end: manifest and hashes, ONNX validity, parity of every path.

    report = verify_bundle("bundles/digits", data="digits.npz")

Three parities, each within ``tol`` (1e-4 absolute), on random raw inputs drawn around
the recorded normalization and, optionally, on a dataset's windows:

* ``model.onnx`` (onnxruntime, CPU, one thread) vs a torch model rebuilt from the bundle
  alone (manifest ``arch`` + ``normalization`` + ``weights.npz``), on logits;
* ``encoder.onnx`` vs that torch model's encoder, on latents;
* ``encoder.onnx`` + the numpy head (`agent.head.Head` on ``head.npz``) vs
  ``model.onnx``, on logits: what the device computes vs the whole exported model.

A quantized bundle (a manifest ``quantization`` section, `export.quantize`) cannot match
the fp32 torch model within 1e-4. For it, encoder + numpy head vs ``model.onnx`` (both int8)
keeps the 1e-4 bound, and the two torch comparisons are reported (max abs diff) and
replaced by an accuracy-agreement check: the argmax of ``model.onnx`` equals torch's on at
least 99% of the data rows of the bundle's classes, and on 75% of 512 random inputs
(which int8 clips: see MIN_AGREEMENT_RANDOM). The report's checks say which ran.

``sae.npz``, when listed, must hold well-formed arrays for the latent dim. Any failure
raises BundleError or VerifyError naming what failed.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from agent.bundle import Bundle, load_bundle
from agent.dataset import load_dataset
from agent.errors import DatasetError
from agent.head import Head
from agent.learner.state import CLASS_STATS
from agent.memory.schema import check_stats
from export.errors import VerifyError
from export.sae import SAE_FILE, check_sae_arrays
from export.train import deterministic_torch
from export.weights import HEAD, WEIGHTS, model_from_manifest

MODEL = "model.onnx"
ENCODER = "encoder.onnx"
EXEMPLARS = "exemplars.npz"
STATS_MEAN_TOL = 1e-5        # latent_mean is float32: its rounding, with room

TOLERANCE = 1e-4
# int8 vs torch fp32: the share of inputs whose argmax agrees. On data rows of the bundle's
# classes, 99% (good int8 encoders measured 99.8-100%). Random inputs sit near decision
# boundaries and outside the calibrated ranges, where int8 clips: good int8 encoders agreed
# on 88-100% of them (digits mlp, cnn1d), a model of another training seed on 60-66%, an
# encoder that belongs to other weights on ~1/K. So 75%, over 512 inputs: a wiring check.
MIN_AGREEMENT = 0.99
MIN_AGREEMENT_RANDOM = 0.75
N_RANDOM_QUANTIZED = 512
MAX_DATA_ROWS = 1024


@dataclass
class VerifyReport:
    path: Path
    bundle_id: str
    checks: list[str] = field(default_factory=list)
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # "random"/"data" -> diff
    diffs: dict[str, dict[str, float]] = field(default_factory=dict)  # per compared pair
    data_accuracy: float | None = None  # on the data rows of the bundle's classes
    data_rows_scored: int = 0
    quantized: bool = False
    agreement: dict[str, float] = field(default_factory=dict)  # int8 only: argmax vs torch
    signed_by: str | None = None  # key id, when verified against public keys

    def lines(self) -> list[str]:
        out = [f"bundle {self.path} (id {self.bundle_id})"]
        out += [f"  ok  {c}" for c in self.checks]
        if self.data_accuracy is not None:
            out.append(f"  accuracy on data: {self.data_accuracy:.4f} "
                       f"({self.data_rows_scored} rows of the bundle's classes)")
        return out


def _check_onnx(bundle: Bundle, name: str, input_name: str | None, output_name: str | None
                ) -> onnx.ModelProto:
    path = bundle.file(name)
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:  # onnx raises several unrelated types for a broken file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerifyError(f"{path}: not a valid ONNX model ({first})") from None
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [input_name] or outputs != [output_name]:
        raise VerifyError(f"{path}: graph inputs {inputs} / outputs {outputs} do not match the "
                          f"manifest ({input_name!r} -> {output_name!r})")
    return proto


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types are not importable stably
        raise VerifyError(f"{path}: onnxruntime cannot load it ({exc})") from None


def random_inputs(bundle: Bundle, n: int, seed: int) -> np.ndarray:
    """Raw inputs around the recorded normalization: mean + 2 * std * N(0, 1)."""
    shape = bundle.input.shape
    norm = bundle.manifest["normalization"]
    bshape = (shape[0], 1) if len(shape) == 2 else (shape[0],)
    mean = np.asarray(norm["mean"], np.float32).reshape(bshape)
    std = np.asarray(norm["std"], np.float32).reshape(bshape)
    rng = np.random.default_rng(seed)
    return (mean + 2.0 * std * rng.standard_normal((n, *shape))).astype(np.float32)


def _data_inputs(bundle: Bundle, data: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to MAX_DATA_ROWS windows of the dataset, and labels as bundle class indices
    (-1 for a class the bundle does not have, e.g. one held out of training)."""
    ds = load_dataset(data, seed=seed)
    if ds.input_shape != bundle.input.shape:
        raise DatasetError(f"{data}: windows have shape {ds.input_shape}, the bundle expects "
                           f"{bundle.input.shape}")
    X = np.concatenate([ds.X, ds.X_test])
    y = np.concatenate([ds.y, ds.y_test])
    if len(X) > MAX_DATA_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(len(X), MAX_DATA_ROWS, replace=False))
        X, y = X[rows], y[rows]
    index = {c: i for i, c in enumerate(bundle.classes)}
    remap = np.array([index.get(c, -1) for c in ds.classes], dtype=np.int64)
    return X, remap[y]


@dataclass
class _Runtimes:
    """Everything that computes outputs from a bundle, for the parity checks."""

    model: torch.nn.Module      # torch, rebuilt from the manifest + weights.npz
    full: ort.InferenceSession  # model.onnx
    encoder: ort.InferenceSession
    head: Head                  # numpy, head.npz
    input_name: str
    encoder_input: str

    def outputs(self, X: np.ndarray, batch: int | None = None) -> dict[str, np.ndarray]:
        batch = batch or self.model.cfg.window_batch()
        keys = ("onnx_logits", "torch_logits", "onnx_latent", "torch_latent", "head_logits")
        out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        with torch.no_grad(), deterministic_torch(threads=1):
            for start in range(0, len(X), batch):
                xb = X[start:start + batch]
                out["onnx_logits"].append(self.full.run(None, {self.input_name: xb})[0])
                out["torch_logits"].append(self.model(torch.from_numpy(xb)).numpy())
                latent = self.encoder.run(None, {self.encoder_input: xb})[0]      # (B, d)
                out["onnx_latent"].append(latent)
                out["torch_latent"].append(self.model.embed(torch.from_numpy(xb)).numpy())
                out["head_logits"].append(self.head.logits(latent))              # (B, K)
        return {k: np.concatenate(v) for k, v in out.items()}


# (report key, got, reference, what is compared, which files disagree when it fails)
_PAIRS = (
    ("model_vs_torch", "onnx_logits", "torch_logits", "|model.onnx - torch| on logits",
     f"model.onnx and {WEIGHTS} disagree"),
    ("encoder_vs_torch", "onnx_latent", "torch_latent",
     "|encoder.onnx - torch encoder| on latents", f"encoder.onnx and {WEIGHTS} disagree"),
    ("encoder_head_vs_model", "head_logits", "onnx_logits",
     "|encoder.onnx + numpy head - model.onnx| on logits",
     f"{HEAD} or encoder.onnx disagree with model.onnx"),
)


_INT8_VS_FP32 = ("model_vs_torch", "encoder_vs_torch")  # bounded by agreement when int8


def _scale(ref: np.ndarray) -> float:
    """Parity is relative above magnitude 1: a MiniRocket latent (PCA of 1,680 standardized
    features) reaches ~100, where float32 summation order alone differs by ~2e-5."""
    return max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0


def _parity(what: str, rt: _Runtimes, X: np.ndarray, tol: float, quantized: bool = False
            ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Max abs diff of every pair, each within ``tol`` (times `_scale`) except, for a quantized bundle,
    the int8-vs-torch pairs (only reported; see `_agreement`)."""
    out = rt.outputs(X)
    diffs = {}
    for key, got, ref, label, hint in _PAIRS:
        if out[got].shape != out[ref].shape:
            raise VerifyError(f"parity on {what}: {got} {out[got].shape} vs {ref} "
                              f"{out[ref].shape} ({hint})")
        diff = float(np.max(np.abs(out[got] - out[ref]))) if out[got].size else 0.0
        bounded = not (quantized and key in _INT8_VS_FP32)
        bound = tol * _scale(out[ref])
        if not np.isfinite(diff) or (bounded and not diff <= bound):
            raise VerifyError(f"parity on {what}: max {label} = {diff:.3g} exceeds {bound:.3g} "
                              f"({tol:g} x max(1, max |reference|); {hint})")
        diffs[key] = diff
    return diffs, out


def _agreement(what: str, out: dict[str, np.ndarray], rows: np.ndarray, minimum: float,
               diffs: dict[str, float]) -> float:
    """Share of ``rows`` where the int8 model.onnx and torch fp32 pick the same class."""
    same = out["onnx_logits"][rows].argmax(axis=1) == out["torch_logits"][rows].argmax(axis=1)
    agreement = float(np.mean(same)) if same.size else 1.0
    if not agreement >= minimum:
        raise VerifyError(f"int8 vs torch on {what}: argmax agrees on {agreement:.1%} of "
                          f"{same.size} inputs, below {minimum:.0%} (max |model.onnx - torch| "
                          f"on logits {diffs['model_vs_torch']:.3g}): the int8 encoder and "
                          f"{WEIGHTS} disagree")
    return agreement


def _parity_line(what: str, diffs: dict[str, float], tol: float,
                 agreement: tuple[float, float, str] | None = None) -> str:
    if agreement is None:
        return (f"parity on {what} (model.onnx/torch, encoder.onnx/torch, encoder+head/"
                f"model.onnx): max abs diff {max(diffs.values()):.2e} <= {tol:g} x max(1, |ref|)")
    share, minimum, rows = agreement
    return (f"parity on {what}: encoder.onnx + numpy head vs model.onnx (both int8) max abs "
            f"diff {diffs['encoder_head_vs_model']:.2e} <= {tol:g}; int8 vs torch fp32 "
            f"(accuracy agreement instead of {tol:g} parity): argmax agrees on {share:.1%} "
            f"of {rows} >= {minimum:.0%}, max abs diff logits {diffs['model_vs_torch']:.3g}, "
            f"latents {diffs['encoder_vs_torch']:.3g}")


def _check_quantization(bundle: Bundle) -> str:
    q = bundle.manifest["quantization"]
    if not isinstance(q, dict) or not isinstance(q.get("method"), str) \
            or not isinstance(q.get("source_bundle"), dict):
        raise VerifyError(f"{bundle.path}: the manifest's 'quantization' section lacks a "
                          "method or source_bundle")
    acc = q.get("accuracy_pct") or {}
    return (f"quantized bundle: {q.get('description', q['method'])} of bundle "
            f"{q['source_bundle'].get('id')}; recorded accuracy {acc.get('before')}% -> "
            f"{acc.get('after')}% (drop {acc.get('drop_points')} points)")


def _check_sae(bundle: Bundle) -> str:
    path = bundle.file(SAE_FILE)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise VerifyError(f"{path}: not a readable sae file ({exc})") from None
    problem = check_sae_arrays(arrays, bundle.manifest["latent_dim"])
    if problem:
        raise VerifyError(f"{path}: {problem}")
    m, k = arrays["W_enc"].shape[0], int(arrays["k"])
    return f"{SAE_FILE}: {m} units, k={k} ({k / m:.1%} active)"


def _check_exemplars(bundle: Bundle) -> str:
    path = bundle.file(EXEMPLARS)
    d, k = bundle.manifest["latent_dim"], len(bundle.classes)
    try:
        with np.load(path, allow_pickle=False) as npz:
            lat, lab, mean = npz["latents"], npz["labels"], npz["latent_mean"]
            stats = {name: npz[name] for name in CLASS_STATS if name in npz.files}
    except (KeyError, OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise VerifyError(f"{path}: not a readable exemplars file ({exc})") from None
    if lat.dtype != np.float32 or lat.ndim != 2 or lat.shape[1] != d \
            or lab.shape != (len(lat),) or lab.dtype.kind not in "iu" \
            or mean.shape != (d,) or not (np.isfinite(lat).all() and np.isfinite(mean).all()):
        raise VerifyError(f"{path}: expected latents float32 (n, {d}), labels (n,) ints and "
                          f"latent_mean ({d},), got {lat.dtype}{list(lat.shape)}, "
                          f"{lab.dtype}{list(lab.shape)}, {list(mean.shape)}")
    if lab.size and (lab.min() < 0 or lab.max() >= k):
        raise VerifyError(f"{path}: labels outside [0, {k})")
    line = f"{EXEMPLARS}: {len(lat)} latents of {len(np.unique(lab))} classes"
    section = bundle.manifest.get("exemplars") or {}
    if not stats and not section.get("class_statistics"):
        return line + " (no class statistics: a bundle from before them)"
    return line + "; " + _check_class_stats(path, stats, lab, mean, k, d,
                                            section.get("n_statistics"))


def _check_class_stats(path: Path, stats: dict[str, np.ndarray], labels: np.ndarray,
                       latent_mean: np.ndarray, k: int, d: int, n: int | None) -> str:
    """The statistics of every training latent (`export.pipeline.class_statistics`) are
    well formed and belong to the same training set as the exemplars: a count per class
    of the manifest, at least as many as its exemplars, and the count-weighted class
    means give ``latent_mean`` (the mean training latent)."""
    missing = [name for name in CLASS_STATS if name not in stats]
    if missing:
        raise VerifyError(f"{path}: lacks {missing} (the manifest's exemplars section lists "
                          f"class statistics, or the file holds only some of them)")
    counts, means, scatter = (stats[name] for name in CLASS_STATS)
    if counts.shape != (k,) or counts.dtype.kind not in "iu" or means.dtype.kind != "f" \
            or scatter.dtype.kind != "f":
        raise VerifyError(f"{path}: class_counts {counts.dtype}{list(counts.shape)}, "
                          f"class_means {means.dtype}, class_scatter {scatter.dtype}; "
                          f"expected ints [{k}] and floats")
    problem = check_stats(counts, means, scatter, d)
    if problem:
        raise VerifyError(f"{path}: class_{problem}")
    per_class = np.bincount(labels, minlength=k)
    short = np.flatnonzero((counts < 1) | (counts < per_class))
    if short.size:
        c = int(short[0])
        raise VerifyError(f"{path}: class_counts[{c}] = {int(counts[c])}, but the class has "
                          f"{int(per_class[c])} exemplars (expected >= 1 and >= that)")
    if n is not None and int(counts.sum()) != n:
        raise VerifyError(f"{path}: class_counts sum to {int(counts.sum())}, the manifest "
                          f"says n_statistics = {n}")
    pooled = counts @ means.astype(np.float64) / counts.sum()                  # (d,)
    err = float(np.abs(pooled - latent_mean).max())
    if err > STATS_MEAN_TOL * (1.0 + float(np.abs(latent_mean).max())):
        raise VerifyError(f"{path}: the count-weighted class_means differ from latent_mean "
                          f"by up to {err:.3g}: statistics of another training set")
    return f"class statistics of {int(counts.sum())} training latents"


def verify_bundle(path: str | Path, data: str | Path | None = None, *, n_random: int = 64,
                  tol: float = TOLERANCE, seed: int = 0, public_keys=None) -> VerifyReport:
    """Verify the bundle at ``path``; return a report or raise BundleError/VerifyError.

    With ``public_keys`` the bundle is loaded as a device configured with them loads it
    (signature, no unlisted files), in the same pass that checks the hashes."""
    bundle = load_bundle(path, public_keys=public_keys or None)
    m = bundle.manifest
    report = VerifyReport(bundle.path, bundle.bundle_id, signed_by=bundle.signed_by)
    report.checks.append(f"manifest format_version {m['format_version']}, "
                         f"sha256 of {len(m['files'])} files")
    spec = m.get("onnx") or {}
    proto = _check_onnx(bundle, MODEL, spec.get("input_name"), spec.get("output_name"))
    enc_spec = m.get("encoder")
    if not isinstance(enc_spec, dict) or enc_spec.get("file") != ENCODER:
        raise VerifyError(f"{bundle.path}: the manifest has no 'encoder' section naming "
                          f"{ENCODER} (a bundle from before the encoder/head split?)")
    _check_onnx(bundle, ENCODER, enc_spec.get("input_name"), enc_spec.get("output_name"))
    report.checks.append(f"onnx.checker: {MODEL}, {ENCODER} (opset "
                         f"{max(o.version for o in proto.opset_import)})")
    bundle.file(WEIGHTS)  # raises BundleError if the manifest does not list (and hash) it
    model = model_from_manifest(bundle.path, m)
    report.checks.append(f"torch model rebuilt from manifest arch {m['arch']['arch']!r} + "
                         f"{WEIGHTS} (split {model.cfg.split}: {model.cfg.split_description()})")
    if m.get("latent_dim") != model.cfg.latent_dim:
        raise VerifyError(f"{bundle.path}: manifest latent_dim={m.get('latent_dim')!r}, the "
                          f"arch's latent is {model.cfg.latent_dim}")
    head = Head.from_npz(bundle.file(HEAD), m)
    report.checks.append(f"{HEAD}: {head.n_layers} layers, {head.latent_dim} -> "
                         f"{head.n_classes}, {head.activation}")
    rt = _Runtimes(model, _session(bundle.file(MODEL)), _session(bundle.file(ENCODER)), head,
                   spec["input_name"], enc_spec["input_name"])

    quantized = report.quantized = "quantization" in m
    if quantized:
        report.checks.append(_check_quantization(bundle))
        n_random = max(n_random, N_RANDOM_QUANTIZED)
    X = random_inputs(bundle, n_random, seed)
    diffs, out = _parity("random inputs", rt, X, tol, quantized)
    report.max_abs_diff["random"] = max(diffs.values())
    report.diffs["random"] = diffs
    agreement = None
    if quantized:
        share = _agreement("random inputs", out, np.ones(len(X), bool), MIN_AGREEMENT_RANDOM,
                           diffs)
        report.agreement["random"] = share
        agreement = (share, MIN_AGREEMENT_RANDOM, "the inputs")
    report.checks.append(_parity_line(f"{n_random} random inputs", diffs, tol, agreement))
    if data is not None:
        X, y = _data_inputs(bundle, Path(data), seed)
        diffs, out = _parity(f"data {data}", rt, X, tol, quantized)
        logits = out["onnx_logits"]
        report.max_abs_diff["data"] = max(diffs.values())
        report.diffs["data"] = diffs
        agreement = None
        if quantized:
            # Rows of classes the bundle was not trained on have no meaningful argmax.
            known = y >= 0
            rows, minimum, which = ((known, MIN_AGREEMENT, "the bundle's classes' rows")
                                    if known.any() else
                                    (~known, MIN_AGREEMENT_RANDOM, "the rows"))
            share = _agreement(f"data {data}", out, rows, minimum, diffs)
            report.agreement["data"] = share
            agreement = (share, minimum, which)
        report.checks.append(_parity_line(f"{len(X)} rows of {data}", diffs, tol, agreement))
        known = y >= 0
        if known.any():
            report.data_accuracy = float(np.mean(logits[known].argmax(axis=1) == y[known]))
            report.data_rows_scored = int(known.sum())
    if SAE_FILE in m["files"]:
        report.checks.append(_check_sae(bundle))
    if EXEMPLARS in m["files"]:
        report.checks.append(_check_exemplars(bundle))
    return report
