"""int8 encoders from a bundle's fp32 one: calibration data, onnxruntime quantization,
the head appended as ONNX, and the end-to-end scoring they are chosen by.

    cal = load_calibration(bundle, "har.npz")
    paths = build_candidates(bundle.file("encoder.onnx"), cal.X_cal, workdir)
    # {"static": Path(...), "dynamic": "skipped: the encoder has no MatMul/Gemm ..."}

`export.quantize` (the command) and `export.bench_latency` (the benchmark) build on these.
See `export.quantize` for why these two methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.bundle import Bundle, sha256_file
from agent.dataset import load_dataset
from agent.errors import BundleError, ConfigError, DatasetError
from agent.head import Head
from export.classes import select_classes

MAX_CALIBRATION_ROWS = 512
CALIBRATION_BATCH = 32
METHODS = ("static", "dynamic")
DESCRIPTIONS = {
    "static": "static int8 (QDQ, per-channel 7-bit weights, MinMax calibration)",
    "dynamic": "dynamic int8 (per-channel MatMul/Gemm weights)",
}


# ---------------------------------------------------------------------- calibration data

@dataclass(frozen=True)
class Calibration:
    """The calibration dataset restricted to the bundle's classes (labels = bundle indices)."""

    path: Path
    sha256: str
    n_bytes: int
    X_cal: np.ndarray    # (n, *input_shape) float32, from the train split
    X_test: np.ndarray   # (m, *input_shape) float32
    y_test: np.ndarray   # (m,) int64 indices into the bundle's classes
    classes_found: tuple[str, ...]

    def info(self) -> dict[str, Any]:
        return {"file": self.path.name, "sha256": self.sha256, "bytes": self.n_bytes,
                "rows": len(self.X_cal), "split": "train", "method": "MinMax",
                "classes": list(self.classes_found)}


def load_calibration(bundle: Bundle, path: str | Path, *, seed: int = 0,
                     max_rows: int = MAX_CALIBRATION_ROWS) -> Calibration:
    """Load ``path`` (NPZ dataset format) for ``bundle``: its train windows of the bundle's
    classes (a seeded sample of at most ``max_rows``) calibrate, its test windows score.

    ``seed`` picks the train/test split of a file without ``X_test``: the bundle's training
    seed reproduces the split the bundle was trained with. Raises DatasetError.
    """
    path = Path(path)
    ds = load_dataset(path, seed=seed)
    if ds.input_shape != bundle.input.shape:
        raise DatasetError(f"{path}: windows have shape {list(ds.input_shape)}, the bundle "
                           f"expects {list(bundle.input.shape)}")
    found = [c for c in bundle.classes if c in ds.classes]
    if not found:
        raise DatasetError(f"{path}: none of the bundle's classes {list(bundle.classes)} is in "
                           f"the dataset (classes {list(ds.classes)[:10]})")
    sub, _ = select_classes(ds, classes=found)
    remap = np.array([bundle.classes.index(c) for c in found], dtype=np.int64)
    if len(sub.X) == 0 or len(sub.X_test) == 0:
        raise DatasetError(f"{path}: needs train and test windows of the bundle's classes, "
                           f"has {len(sub.X)} train and {len(sub.X_test)} test")
    rows = np.random.default_rng(seed).permutation(len(sub.X))[:max_rows]
    return Calibration(path, sha256_file(path), path.stat().st_size,
                       np.ascontiguousarray(sub.X[np.sort(rows)]), sub.X_test,
                       remap[sub.y_test], tuple(found))


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over fixed windows, in batches."""

    def __init__(self, input_name: str, X: np.ndarray, batch: int = CALIBRATION_BATCH):
        self._batches = iter([{input_name: X[i:i + batch]} for i in range(0, len(X), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


# ---------------------------------------------------------------------- building

def has_matmul(proto: onnx.ModelProto) -> bool:
    return any(n.op_type in ("MatMul", "Gemm") for n in proto.graph.node)


def build_candidates(encoder_path: Path, X_cal: np.ndarray, workdir: Path,
                     methods: tuple[str, ...] = METHODS) -> dict[str, Path | str]:
    """Quantize ``encoder_path`` with each method into ``workdir``.

    Returns method -> path of the int8 model, or -> a one-line reason it was skipped or
    failed (a candidate that onnxruntime cannot build must not hide the others).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = workdir / "pre.onnx"
    # Shape inference + onnxruntime's basic graph optimizations: the quantizer needs
    # every tensor's type and rank, and fused BatchNorm/constant nodes quantize better.
    quant_pre_process(str(encoder_path), str(pre))
    proto = onnx.load(str(pre))
    input_name = proto.graph.input[0].name
    out: dict[str, Path | str] = {}
    for method in methods:
        dst = workdir / f"{method}.onnx"
        try:
            if method == "static":
                # reduce_range (7-bit weights): x86 without VNNI multiplies u8 x s8 pairs
                # into saturating int16 sums, which full-range per-channel weights overflow.
                # Measured on AVX2: mean latent error of the test cnn1d 2.8% -> 0.9% (one
                # test window of 96 flipped without it), no change in speed or for mlps.
                quantize_static(str(pre), str(dst), _Reader(input_name, X_cal),
                                quant_format=QuantFormat.QDQ, per_channel=True,
                                reduce_range=True, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax)
            elif method == "dynamic":
                if not has_matmul(proto):
                    out[method] = "skipped: the encoder has no MatMul/Gemm (convolutions only)"
                    continue
                quantize_dynamic(str(pre), str(dst), op_types_to_quantize=["MatMul", "Gemm"],
                                 per_channel=True, weight_type=QuantType.QInt8)
            else:
                raise ConfigError(f"quantization method {method!r}, expected one of "
                                  f"{list(METHODS)}")
            out[method] = dst
        except ConfigError:
            raise
        except Exception as exc:  # onnxruntime.quantization raises many unrelated types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            out[method] = f"failed: {first[:200]}"
    return out


def with_head(encoder: onnx.ModelProto, head: Head, latent_name: str, output_name: str
              ) -> onnx.ModelProto:
    """The encoder graph followed by ``head`` as fp32 Gemm (+ activation) nodes:
    raw window -> logits, the same computation as encoder.onnx + `Head.logits`."""
    model = onnx.ModelProto()
    model.CopyFrom(encoder)
    g = model.graph
    outputs = [o for o in g.output if o.name == latent_name]
    if len(outputs) != 1:
        raise BundleError(f"encoder graph has outputs {[o.name for o in g.output]}, expected "
                          f"{latent_name!r}")
    batch = outputs[0].type.tensor_type.shape.dim[0]
    del g.output[:]
    h = latent_name
    last = head.n_layers - 1
    for i, (W, b) in enumerate(zip(head.weights, head.biases, strict=True)):
        g.initializer.extend([numpy_helper.from_array(W, f"head.W{i}"),
                              numpy_helper.from_array(b, f"head.b{i}")])
        z = output_name if i == last else f"head.z{i}"
        g.node.append(helper.make_node("Gemm", [h, f"head.W{i}", f"head.b{i}"], [z],
                                       name=f"head.gemm{i}", transB=1))  # h @ W.T + b
        h = z
        if i < last and head.activation == "relu":
            h = f"head.h{i}"
            g.node.append(helper.make_node("Relu", [z], [h], name=f"head.relu{i}"))
        elif i < last and head.activation != "identity":
            raise BundleError(f"head activation {head.activation!r} has no ONNX mapping here")
    out = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [None, head.n_classes])
    out.type.tensor_type.shape.dim[0].CopyFrom(batch)
    g.output.append(out)
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------- measuring

def encode_all(session, X: np.ndarray, batch: int = 256) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: X[i:i + batch]})[0]
                           for i in range(0, len(X), batch)])        # (N, latent_dim)


def accuracy_pct(head: Head, Z: np.ndarray, y: np.ndarray) -> float:
    return round(100.0 * float(np.mean(head.logits(Z).argmax(axis=1) == y)), 2)


def batch1(session):
    """``x (*input_shape) -> session output``: one window per call, as the device runs it."""
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x[None]})
