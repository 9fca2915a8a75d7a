"""Byte formats of the write-ahead log: segment files, record frames, record payloads.

Segment file ``wal-<first seq, 12 digits>.log``::

    offset  size  field
    0       8     magic  b"RVWAL\\x00\\x01\\n"   (the \\x01 is the format version)
    8       8     u64    seq of the first record in this segment (== the file name's number)
    16      ...   frames, back to back

Frame (all integers little-endian)::

    0   4  u32  n = payload length in bytes
    4   8  u64  seq (consecutive: the first frame has the segment's first seq, then +1)
    12  4  u32  crc32(payload)
    16  4  u32  crc32(bytes 0..16 of this frame)  -- header check, and the resync marker
    20  n       payload (opaque bytes; `encode_record` offers a pickle-free encoding)

Two CRC32s, so any single flipped bit (in fact any burst of up to 32 bits) in the header
or in the payload is detected: a damaged length can never make the reader trust a
wrong payload boundary. `scan_segment` is pure (bytes in, records out) so it can be
property-tested without a file system.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agent.errors import StateError

SEGMENT_MAGIC = b"RVWAL\x00\x01\n"
SEGMENT_HEADER = struct.Struct("<8sQ")
FRAME_HEAD = struct.Struct("<IQI")  # length, seq, payload crc; followed by the header crc
FRAME_OVERHEAD = FRAME_HEAD.size + 4
SEGMENT_RE = re.compile(r"^wal-(\d{1,20})\.log$")
_HEADER_CRC = struct.Struct("<I")
_RESYNC_SEQS = 16  # how far ahead a damaged segment is searched for surviving records


def segment_name(first_seq: int) -> str:
    return f"wal-{first_seq:012d}.log"


def segment_header(first_seq: int) -> bytes:
    return SEGMENT_HEADER.pack(SEGMENT_MAGIC, first_seq)


def encode_frame(seq: int, payload: bytes) -> bytes:
    """One record frame: header (length, seq, payload crc, header crc) + payload."""
    head = FRAME_HEAD.pack(len(payload), seq, zlib.crc32(payload))
    return head + _HEADER_CRC.pack(zlib.crc32(head)) + payload


@dataclass(frozen=True)
class Damage:
    """Where and why reading a segment stopped early.

    ``kind="torn"``: the segment ends inside a record (incomplete header or payload, or a
    zero-filled tail) -- what an interrupted write leaves. ``kind="corrupt"``: bytes that
    are there but wrong (bad checksum, wrong seq, bad segment header).
    """

    offset: int
    kind: Literal["torn", "corrupt"]
    reason: str
    expected_seq: int
    later_seqs: tuple[int, int, int] | None = None  # (first, last, count) of intact frames after it


@dataclass
class SegmentScan:
    records: list[tuple[int, bytes]] = field(default_factory=list)
    end: int = SEGMENT_HEADER.size  # offset just past the last valid frame
    damage: Damage | None = None

    @property
    def next_seq(self) -> int | None:
        return self.records[-1][0] + 1 if self.records else None


def _frame_ok(data: bytes, off: int, seq: int, max_record_bytes: int) -> int | None:
    """Length of the valid frame with `seq` at `off`, or None."""
    if off < 0 or len(data) - off < FRAME_OVERHEAD:
        return None
    n, rseq, pcrc = FRAME_HEAD.unpack_from(data, off)
    (hcrc,) = _HEADER_CRC.unpack_from(data, off + FRAME_HEAD.size)
    if zlib.crc32(data[off : off + FRAME_HEAD.size]) != hcrc or rseq != seq or n > max_record_bytes:
        return None
    end = off + FRAME_OVERHEAD + n
    if end > len(data) or zlib.crc32(data[off + FRAME_OVERHEAD : end]) != pcrc:
        return None
    return FRAME_OVERHEAD + n


def find_later_frames(data: bytes, start: int, min_seq: int, max_record_bytes: int):
    """(first, last, count) of the run of intact frames found after a damaged spot.

    Searches for the seq bytes of the next few expected records (C-speed `bytes.find`),
    so a damaged record followed by intact ones is reported as such.
    """
    for seq in range(min_seq, min_seq + _RESYNC_SEQS):
        pos = data.find(struct.pack("<Q", seq), start + 4)
        while pos != -1:
            off = pos - 4
            size = _frame_ok(data, off, seq, max_record_bytes)
            if size is not None:
                first, count = seq, 0
                while size is not None:
                    off, seq, count = off + size, seq + 1, count + 1
                    size = _frame_ok(data, off, seq, max_record_bytes)
                return first, seq - 1, count
            pos = data.find(struct.pack("<Q", seq), pos + 1)
    return None


def scan_segment(data: bytes, first_seq: int, max_record_bytes: int) -> SegmentScan:
    """Parse a whole segment; stop at the first frame that is not valid.

    Returns every valid record before that point (always a prefix of what was written)
    and a `Damage` if anything after it was not a clean end of file.
    """
    scan = SegmentScan()
    if len(data) < SEGMENT_HEADER.size:
        scan.end = 0
        scan.damage = Damage(0, "torn", f"segment header incomplete ({len(data)} bytes)", first_seq)
        return scan
    magic, header_seq = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC or header_seq != first_seq:
        scan.end = 0
        reason = (
            f"bad segment magic {magic!r}" if magic != SEGMENT_MAGIC
            else f"segment header names first seq {header_seq}, file name says {first_seq}"
        )
        scan.damage = Damage(0, "corrupt", reason, first_seq)
        return scan
    off, seq = SEGMENT_HEADER.size, first_seq
    while off < len(data):
        size = _frame_ok(data, off, seq, max_record_bytes)
        if size is None:
            scan.damage = _diagnose(data, off, seq, max_record_bytes)
            break
        scan.records.append((seq, data[off + FRAME_OVERHEAD : off + size]))
        off, seq = off + size, seq + 1
    scan.end = off
    return scan


def _diagnose(data: bytes, off: int, seq: int, max_record_bytes: int) -> Damage:
    rest = len(data) - off
    if data.count(0, off) == rest:
        return Damage(off, "torn", f"zero-filled tail of {rest} bytes", seq)
    if rest < FRAME_OVERHEAD:
        return Damage(off, "torn", f"incomplete record header ({rest} of {FRAME_OVERHEAD} bytes)", seq)
    n, rseq, _ = FRAME_HEAD.unpack_from(data, off)
    (hcrc,) = _HEADER_CRC.unpack_from(data, off + FRAME_HEAD.size)
    if zlib.crc32(data[off : off + FRAME_HEAD.size]) != hcrc:
        reason = "record header checksum mismatch"
    elif rseq != seq:
        reason = f"record has seq {rseq}, expected {seq}"
    elif n > max_record_bytes:
        reason = f"record length {n} exceeds max_record_bytes={max_record_bytes}"
    elif off + FRAME_OVERHEAD + n > len(data):
        have = rest - FRAME_OVERHEAD
        return Damage(off, "torn", f"incomplete record payload ({have} of {n} bytes)", seq)
    else:
        reason = "record payload checksum mismatch"
    later = find_later_frames(data, off, seq, max_record_bytes)
    return Damage(off, "corrupt", reason, seq, later)


# ---------------------------------------------------------------------------------------
# Payload helpers: a small JSON header plus raw little-endian arrays. No pickle.
#
#   0   4  magic b"RVR1"
#   4   4  u32 length of the JSON header
#   8   h  JSON {"meta": {...}, "arrays": [[name, dtype, shape, nbytes], ...]}
#   8+h    array bytes, C order, in the listed order
# ---------------------------------------------------------------------------------------

RECORD_MAGIC = b"RVR1"
_RECORD_HEAD = struct.Struct("<4sI")
_ARRAY_KINDS = "biufc"  # bool, int, uint, float, complex: nothing that needs pickle


def encode_record(meta: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> bytes:
    """Encode a JSON-able `meta` dict and numeric arrays into one log payload.

    >>> p = encode_record({"label": "walk"}, {"h": np.zeros(4, np.float32)})
    >>> decode_record(p)[0]
    {'label': 'walk'}
    """
    specs, blobs = [], []
    for name, arr in (arrays or {}).items():
        a = np.asarray(arr, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if a.dtype.kind not in _ARRAY_KINDS:
            raise StateError(f"array {name!r} has dtype {a.dtype}; expected a numeric dtype")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        specs.append([str(name), a.dtype.str, list(a.shape), a.nbytes])
        blobs.append(a.tobytes())
    try:
        header = json.dumps({"meta": meta, "arrays": specs}, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise StateError(f"record meta is not plain JSON: {exc}") from exc
    return b"".join([_RECORD_HEAD.pack(RECORD_MAGIC, len(header)), header, *blobs])


def decode_record(payload: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Inverse of `encode_record`; raises `StateError` on any malformed payload."""
    if len(payload) < _RECORD_HEAD.size:
        raise StateError(f"record payload too short ({len(payload)} bytes)")
    magic, h = _RECORD_HEAD.unpack_from(payload)
    if magic != RECORD_MAGIC or _RECORD_HEAD.size + h > len(payload):
        raise StateError(f"record payload has bad magic {magic!r} or header length {h}")
    try:
        header = json.loads(payload[_RECORD_HEAD.size : _RECORD_HEAD.size + h])
        meta, specs = header["meta"], header["arrays"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"record header is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(specs, list):
        raise StateError("record header must hold a 'meta' object and an 'arrays' list")
    off, arrays = _RECORD_HEAD.size + h, {}
    for spec in specs:
        try:
            name, dtype_str, shape, nbytes = spec
            dtype = np.dtype(dtype_str)
            shape = tuple(int(d) for d in shape)
        except (ValueError, TypeError) as exc:
            raise StateError(f"record array spec {spec!r} is malformed: {exc}") from exc
        if dtype.kind not in _ARRAY_KINDS or any(d < 0 for d in shape):
            raise StateError(f"record array {name!r}: unsupported dtype {dtype} or shape {shape}")
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != nbytes or off + nbytes > len(payload):
            raise StateError(f"record array {name!r}: {nbytes} bytes do not fit shape {shape}")
        arrays[name] = np.frombuffer(payload, dtype, count=nbytes // max(dtype.itemsize, 1),
                                     offset=off).reshape(shape).copy()
        off += nbytes
    if off != len(payload):
        raise StateError(f"record payload has {len(payload) - off} trailing bytes")
    return meta, arrays
