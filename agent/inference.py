"""onnxruntime sessions set up for small devices, and the bundle's classifier.

Small boards have 2-4 cores that the agent shares with everything else: one intra-op
thread by default, sequential execution, and thread spinning off (a spinning pool keeps
an idle core at 100%).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.bundle import Bundle
from agent.errors import BundleError


def make_session(model: Path | bytes, *, threads: int = 1, name: str | None = None):
    """An onnxruntime CPU session from a model file or its bytes (`Bundle.data`: the
    bytes that were hashed): `threads` intra-op threads, no spinning, all graph
    optimizations. `name` is used in errors for bytes."""
    import onnxruntime as ort

    if threads < 1:
        raise ValueError(f"threads={threads}, expected >= 1")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    try:
        source = bytes(model) if isinstance(model, bytes | bytearray | memoryview) else str(model)
        return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(f"{name or model}: onnxruntime cannot load it ({exc})") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Classifier:
    """The bundle's whole model (``model.onnx``): raw windows in, class probabilities out.

    >>> clf = Classifier(load_bundle("bundle/"))          # doctest: +SKIP
    >>> clf.predict_proba(np.zeros((1, 6, 128), "f4"))    # doctest: +SKIP
    """

    def __init__(self, bundle: Bundle, *, threads: int = 1):
        self.bundle = bundle
        self.session = make_session(bundle.data("model.onnx"), threads=threads,
                                    name=bundle.file("model.onnx"))
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        shape = inputs[0].shape  # e.g. ['batch', 6, 128]
        static = tuple(d for d in shape[1:])
        if any(isinstance(d, int) for d in static) and static != bundle.input.shape:
            raise BundleError(
                f"{bundle.path}: model.onnx input shape {shape} does not match the manifest's "
                f"input.shape {list(bundle.input.shape)}")
        # Warm up: the first run pays for allocations and kernel selection.
        self.predict_proba(np.zeros((1, *bundle.input.shape), dtype=np.float32))

    def predict_proba(self, windows: np.ndarray) -> np.ndarray:
        """``windows`` (B, *input.shape) float32 -> probabilities (B, K)."""
        if windows.shape[1:] != self.bundle.input.shape:
            raise ValueError(
                f"window shape {windows.shape[1:]}, expected {self.bundle.input.shape}")
        (logits,) = self.session.run([self.output_name], {self.input_name: windows})
        if logits.shape != (windows.shape[0], len(self.bundle.classes)):
            raise BundleError(
                f"model.onnx returned shape {logits.shape}, expected "
                f"({windows.shape[0]}, {len(self.bundle.classes)})")
        return softmax(logits.astype(np.float64))


class Encoder:
    """The bundle's frozen encoder (``encoder.onnx``): raw windows in, latents out.

    Normalization is inside the graph, like ``model.onnx``; the latent is what the fast
    system stores and the numpy head (`agent.head.Head`) reads.

    >>> enc = Encoder(load_bundle("bundle/"))             # doctest: +SKIP
    >>> enc.encode(np.zeros((4, 6, 128), "f4")).shape     # doctest: +SKIP
    (4, 64)
    """

    def __init__(self, bundle: Bundle, *, threads: int = 1):
        spec = bundle.manifest.get("encoder")
        if not isinstance(spec, dict):
            raise BundleError(f"{bundle.path}: the manifest has no 'encoder' section "
                              "(a bundle from before the encoder/head split)")
        latent_dim = bundle.manifest.get("latent_dim")
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise BundleError(f"{bundle.path}: latent_dim={latent_dim!r}, expected an int >= 1")
        self.bundle = bundle
        self.latent_dim = latent_dim
        name = spec.get("file", "encoder.onnx")
        self.session = make_session(bundle.data(name), threads=threads, name=bundle.file(name))
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.encode(np.zeros((1, *bundle.input.shape), dtype=np.float32))  # warm up

    def encode(self, windows: np.ndarray) -> np.ndarray:
        """``windows`` (B, *input.shape) -> latents (B, latent_dim) float32."""
        windows = np.asarray(windows)
        if windows.ndim != 1 + len(self.bundle.input.shape) \
                or windows.shape[1:] != self.bundle.input.shape:
            raise ValueError(f"windows have shape {windows.shape}, expected "
                             f"(B, {', '.join(map(str, self.bundle.input.shape))})")
        x = windows.astype(np.float32, copy=False)
        (latent,) = self.session.run([self.output_name], {self.input_name: x})
        if latent.shape != (windows.shape[0], self.latent_dim):
            raise BundleError(f"encoder.onnx returned shape {latent.shape}, expected "
                              f"({windows.shape[0]}, {self.latent_dim})")
        return latent.astype(np.float32, copy=False)
