"""The wire format, shared by the agent and firmware_sim (docs/protocol.md).

Frames carry ``n_samples x n_channels`` sensor values in one of two encodings:

* JSON: ``{"seq": 12, "ts": 1732790000.25, "values": [[c0, c1, ...], ...]}``
* binary: a 24-byte little-endian header followed by float32 values, row-major
  (sample by sample)::

      offset size  field
      0      2     magic b"RV"
      2      1     version (1)
      3      1     flags (0; reserved)
      4      8     seq (uint64)
      12     8     ts (float64, seconds since the epoch)
      20     2     n_samples (uint16)
      22     2     n_channels (uint16)
      24     4*n   values (float32)

A decoder tells the two apart by the first byte (``{`` or the magic). Every decoding
failure raises ProtocolError with a stable ``reason`` code and a message naming the
bad value; nothing on the wire can make it raise anything else.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from agent.errors import ProtocolError

PROTOCOL_VERSION = 1
BINARY_MAGIC = b"RV"
BINARY_HEADER = struct.Struct("<2sBBQdHH")  # 24 bytes
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_SAMPLES = 4096
MAX_CHANNELS = 256
_MAX_SEQ = 2**64 - 1


@dataclass(frozen=True)
class Frame:
    """A decoded, validated frame: ``values`` is float32 ``(n_samples, n_channels)``."""

    seq: int
    ts: float
    values: np.ndarray  # (S, C) float32, finite

    @property
    def n_samples(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.values.shape[1])


def _check_values(values: np.ndarray, where: str) -> np.ndarray:
    if values.ndim != 2:
        raise ProtocolError(
            "bad_shape", f"{where}: values must be 2-D (samples x channels), got shape {values.shape}"
        )
    n_samples, n_channels = values.shape
    if not 1 <= n_samples <= MAX_SAMPLES:
        raise ProtocolError(
            "bad_shape", f"{where}: n_samples={n_samples}, expected 1..{MAX_SAMPLES}"
        )
    if not 1 <= n_channels <= MAX_CHANNELS:
        raise ProtocolError(
            "bad_shape", f"{where}: n_channels={n_channels}, expected 1..{MAX_CHANNELS}"
        )
    finite = np.isfinite(values)
    if not finite.all():
        s, c = np.argwhere(~finite)[0]
        raise ProtocolError(
            "non_finite",
            f"{where}: values[{s}][{c}]={values[s, c]} is not finite (NaN/Inf are rejected)",
        )
    return values


def _check_seq_ts(seq: object, ts: object) -> tuple[int, float]:
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= _MAX_SEQ:
        raise ProtocolError("bad_seq", f"seq={seq!r}, expected an integer in 0..2**64-1")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not finite_number(ts):
        shown = str(ts)[:40] if isinstance(ts, int) else repr(ts)[:60]
        raise ProtocolError("bad_ts", f"ts={shown}, expected a finite number (epoch seconds)")
    return seq, float(ts)


def finite_number(v: int | float) -> bool:
    """A finite float, or an int a float can hold (JSON integers have no size limit)."""
    if isinstance(v, int):
        return abs(v) <= 2**1000
    return math.isfinite(v)


def encode_frame_json(seq: int, ts: float, values: np.ndarray) -> bytes:
    """Encode a frame as JSON (values are written with float32 precision)."""
    arr = np.asarray(values, dtype=np.float32)
    _check_values(arr, "frame")
    _check_seq_ts(int(seq), float(ts))
    rows = [[float(f"{v:.7g}") for v in row] for row in arr.tolist()]
    return json.dumps({"seq": int(seq), "ts": float(ts), "values": rows},
                      separators=(",", ":")).encode()


def encode_frame_binary(seq: int, ts: float, values: np.ndarray) -> bytes:
    """Encode a frame in the compact binary format (see the module docstring)."""
    arr = np.ascontiguousarray(values, dtype="<f4")
    _check_values(arr, "frame")
    _check_seq_ts(int(seq), float(ts))
    n_samples, n_channels = arr.shape
    header = BINARY_HEADER.pack(BINARY_MAGIC, PROTOCOL_VERSION, 0, int(seq), float(ts),
                                n_samples, n_channels)
    return header + arr.tobytes()


def checked_bytes(payload: object, what: str, max_bytes: int) -> bytes:
    """`payload` as bytes, or ProtocolError: not bytes, over `max_bytes`, empty."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ProtocolError("bad_type", f"{what} of type {type(payload).__name__}, expected bytes")
    payload = bytes(payload)
    if len(payload) > max_bytes:
        raise ProtocolError("oversized", f"{what} of {len(payload)} bytes exceeds "
                            f"max_bytes={max_bytes}")
    if not payload:
        raise ProtocolError("empty", f"empty {what}")
    return payload


def load_json_object(payload: bytes, what: str) -> dict:
    """A JSON object (NaN/Infinity constants refused), or ProtocolError ``bad_json``."""
    try:
        obj = json.loads(payload, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def values_from_json(rows: object, where: str) -> np.ndarray:
    """JSON ``values`` (a list of samples, each a list of channel numbers) -> validated
    float32 ``(samples, channels)``; `where` prefixes the messages (``"label "``)."""
    if not isinstance(rows, list) or not rows:
        raise ProtocolError("bad_shape", f"{where}values must be a non-empty list of samples")
    if not all(isinstance(r, list) for r in rows):
        raise ProtocolError("bad_shape", f"{where}values must be a list of lists "
                            "(samples x channels)")
    width = len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != width:
            raise ProtocolError(
                "bad_shape", f"{where}values[{i}] has {len(r)} channels, values[0] has {width}")
        for j, v in enumerate(r):
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ProtocolError("bad_value", f"{where}values[{i}][{j}]={v!r} is not a number")
    name = where.strip() or "frame"
    return _check_values(as_float32(rows, name), name)


def decode_frame(payload: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> Frame:
    """Decode a JSON or binary frame; raise ProtocolError naming what is wrong."""
    payload = checked_bytes(payload, "payload", max_bytes)
    if payload[:2] == BINARY_MAGIC:
        return _decode_binary(payload)
    return _decode_json(payload)


def _decode_binary(payload: bytes) -> Frame:
    if len(payload) < BINARY_HEADER.size:
        raise ProtocolError(
            "bad_binary", f"binary frame of {len(payload)} bytes is shorter than the "
            f"{BINARY_HEADER.size}-byte header")
    _, version, flags, seq, ts, n_samples, n_channels = BINARY_HEADER.unpack_from(payload)
    if version != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"binary frame version={version}, expected {PROTOCOL_VERSION}")
    if flags != 0:
        raise ProtocolError("bad_binary", f"binary frame flags={flags}, expected 0")
    expected = BINARY_HEADER.size + 4 * n_samples * n_channels
    if len(payload) != expected:
        raise ProtocolError(
            "bad_binary", f"binary frame is {len(payload)} bytes, header says "
            f"{n_samples}x{n_channels} float32 = {expected} bytes")
    seq, ts = _check_seq_ts(seq, ts)
    values = np.frombuffer(payload, dtype="<f4", offset=BINARY_HEADER.size)
    values = values.reshape(n_samples, n_channels).astype(np.float32)
    return Frame(seq, ts, _check_values(values, "binary frame"))


def _reject_constant(name: str) -> float:
    raise ProtocolError("non_finite", f"JSON constant {name} is not allowed")


def _decode_json(payload: bytes) -> Frame:
    obj = load_json_object(payload, "frame")
    missing = [k for k in ("seq", "ts", "values") if k not in obj]
    if missing:
        raise ProtocolError("missing_field", f"frame lacks field(s) {missing}")
    unknown = sorted(set(obj) - {"seq", "ts", "values"})
    if unknown:
        raise ProtocolError("unknown_field", f"frame has unknown field(s) {unknown}")
    seq, ts = _check_seq_ts(obj["seq"], obj["ts"])
    return Frame(seq, ts, values_from_json(obj["values"], ""))


def as_float32(rows: list, where: str) -> np.ndarray:
    """Validated JSON rows of numbers -> float32; too-large values become Inf (rejected by
    `_check_values`), integers too large even for float64 a ProtocolError."""
    try:
        with np.errstate(over="ignore"):
            return np.asarray(rows, dtype=np.float64).astype(np.float32)
    except OverflowError:
        raise ProtocolError("non_finite", f"{where}: a value is too large for a float "
                            "(NaN/Inf are rejected)") from None


# --- outbound payloads ------------------------------------------------------


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def encode_prediction(*, device: str, window: int, seq_first: int, seq_last: int, ts: float,
                      label: str, confidence: float, probs: dict[str, float],
                      latency_ms: float, model: str, **extra: object) -> bytes:
    """One prediction per window (docs/protocol.md#predictions); `extra` adds fields such
    as ``decided_by`` and ``novelty`` from the learner."""
    return _dumps({
        "v": PROTOCOL_VERSION, "device": device, "window": window,
        "seq_first": seq_first, "seq_last": seq_last, "ts": ts, "label": label,
        "confidence": round(float(confidence), 6),
        "probs": {k: round(float(p), 6) for k, p in probs.items()},
        "latency_ms": round(float(latency_ms), 3), "model": model, **extra,
    })


def encode_event(*, device: str, type: str, reason: str, detail: str, ts: float,
                 topic: str | None = None, **extra: object) -> bytes:
    """An event (docs/protocol.md#events): ``type`` is e.g. ``"error"``."""
    body: dict[str, object] = {"v": PROTOCOL_VERSION, "device": device, "type": type,
                               "reason": reason, "detail": detail[:500], "ts": ts}
    if topic is not None:
        body["topic"] = topic
    body.update(extra)
    return _dumps(body)


def encode_status(*, state: str, **fields: object) -> bytes:
    """The retained status message; ``state`` is ``"online"`` or ``"offline"``."""
    if state not in ("online", "offline"):
        raise ValueError(f"Invalid status state: {state!r} (expected 'online' or 'offline')")
    return _dumps({"v": PROTOCOL_VERSION, "state": state, **fields})


def decode_json_object(payload: bytes, what: str) -> dict:
    """Decode an outbound JSON payload (used by the simulator, tests and tools)."""
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("bad_json", f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", f"{what} must be a JSON object")
    return obj
