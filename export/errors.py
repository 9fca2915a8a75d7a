"""Errors raised only by `export` (the shared hierarchy lives in `agent.errors`)."""

from agent.errors import ReverieError


class VerifyError(ReverieError):
    """A bundle loads but fails a check: ONNX validity, weights, or torch/ONNX parity."""


class QuantizeError(ReverieError):
    """Quantization refused: the int8 model loses more accuracy than allowed, or none builds."""
