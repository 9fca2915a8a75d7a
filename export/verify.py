"""Check a bundle end to end: manifest and hashes, ONNX validity, torch/ONNX parity.

    report = verify_bundle("bundles/digits", data="digits.npz")

Parity compares onnxruntime (CPU, one thread) with a torch model rebuilt from the
bundle alone (manifest ``arch`` + ``normalization`` + ``weights.npz``), on random raw
inputs drawn around the recorded normalization and, optionally, on a dataset's windows.
Any failure raises BundleError or VerifyError naming what failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from agent.bundle import Bundle, load_bundle
from agent.dataset import load_dataset
from agent.errors import DatasetError
from export.errors import VerifyError
from export.train import deterministic_torch
from export.weights import WEIGHTS, model_from_manifest

TOLERANCE = 1e-4
MAX_DATA_ROWS = 1024


@dataclass
class VerifyReport:
    path: Path
    bundle_id: str
    checks: list[str] = field(default_factory=list)
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # "random"/"data" -> diff
    data_accuracy: float | None = None

    def lines(self) -> list[str]:
        out = [f"bundle {self.path} (id {self.bundle_id})"]
        out += [f"  ok  {c}" for c in self.checks]
        if self.data_accuracy is not None:
            out.append(f"  accuracy on data: {self.data_accuracy:.4f}")
        return out


def _check_onnx(bundle: Bundle) -> onnx.ModelProto:
    path = bundle.file("model.onnx")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:  # onnx raises several unrelated types for a broken file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerifyError(f"{path}: not a valid ONNX model ({first})") from None
    spec = bundle.manifest.get("onnx") or {}
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [spec.get("input_name")] or outputs != [spec.get("output_name")]:
        raise VerifyError(f"{path}: graph inputs {inputs} / outputs {outputs} do not match the "
                          f"manifest's onnx {spec}")
    return proto


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types are not importable stably
        raise VerifyError(f"{path}: onnxruntime cannot load it ({exc})") from None


def _random_inputs(bundle: Bundle, n: int, seed: int) -> np.ndarray:
    """Raw inputs around the recorded normalization: mean + 2 * std * N(0, 1)."""
    shape = bundle.input.shape
    norm = bundle.manifest["normalization"]
    bshape = (shape[0], 1) if len(shape) == 2 else (shape[0],)
    mean = np.asarray(norm["mean"], np.float32).reshape(bshape)
    std = np.asarray(norm["std"], np.float32).reshape(bshape)
    rng = np.random.default_rng(seed)
    return (mean + 2.0 * std * rng.standard_normal((n, *shape))).astype(np.float32)


def _data_inputs(bundle: Bundle, data: Path, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Up to MAX_DATA_ROWS windows of the dataset, and labels as bundle class indices if
    every dataset class is a bundle class (else None)."""
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
    if not set(ds.classes) <= set(index):
        return X, None
    remap = np.array([index[c] for c in ds.classes], dtype=np.int64)
    return X, remap[y]


def _parity(what: str, sess: ort.InferenceSession, model: torch.nn.Module, X: np.ndarray,
            input_name: str, tol: float, batch: int = 256) -> tuple[float, np.ndarray]:
    diffs, all_logits = [], []
    with torch.no_grad(), deterministic_torch(threads=1):
        for start in range(0, len(X), batch):
            xb = X[start:start + batch]
            got = sess.run(None, {input_name: xb})[0]          # (B, K)
            ref = model(torch.from_numpy(xb)).numpy()          # (B, K)
            if got.shape != ref.shape:
                raise VerifyError(f"parity on {what}: onnx logits {got.shape} vs torch {ref.shape}")
            diffs.append(float(np.max(np.abs(got - ref))))
            all_logits.append(got)
    diff = max(diffs)
    if not diff <= tol:  # also catches NaN
        raise VerifyError(f"parity on {what}: max |onnx - torch| = {diff:.3g} on logits exceeds "
                          f"{tol:g} (model.onnx and {WEIGHTS} disagree)")
    return diff, np.concatenate(all_logits)


def verify_bundle(path: str | Path, data: str | Path | None = None, *, n_random: int = 64,
                  tol: float = TOLERANCE, seed: int = 0) -> VerifyReport:
    """Verify the bundle at ``path``; return a report or raise BundleError/VerifyError."""
    bundle = load_bundle(path)
    report = VerifyReport(bundle.path, bundle.bundle_id)
    report.checks.append(f"manifest format_version {bundle.manifest['format_version']}, "
                         f"sha256 of {len(bundle.manifest['files'])} files")
    proto = _check_onnx(bundle)
    report.checks.append(f"onnx.checker: model.onnx (opset "
                         f"{max(o.version for o in proto.opset_import)})")
    bundle.file(WEIGHTS)  # raises BundleError if the manifest does not list (and hash) it
    model = model_from_manifest(bundle.path, bundle.manifest)
    report.checks.append(f"torch model rebuilt from manifest arch "
                         f"{bundle.manifest['arch']['arch']!r} + {WEIGHTS}")
    sess = _session(bundle.file("model.onnx"))
    input_name = bundle.manifest["onnx"]["input_name"]

    X = _random_inputs(bundle, n_random, seed)
    diff, _ = _parity("random inputs", sess, model, X, input_name, tol)
    report.max_abs_diff["random"] = diff
    report.checks.append(f"parity on {n_random} random inputs: max abs diff {diff:.2e} <= {tol:g}")
    if data is not None:
        X, y = _data_inputs(bundle, Path(data), seed)
        diff, logits = _parity(f"data {data}", sess, model, X, input_name, tol)
        report.max_abs_diff["data"] = diff
        report.checks.append(
            f"parity on {len(X)} rows of {data}: max abs diff {diff:.2e} <= {tol:g}")
        if y is not None:
            report.data_accuracy = float(np.mean(logits.argmax(axis=1) == y))
    return report
