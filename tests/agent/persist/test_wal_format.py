"""Framing properties of the write-ahead log, on bytes (no file system)."""

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.errors import StateError
from agent.persist.wal_format import (
    FRAME_OVERHEAD,
    SEGMENT_HEADER,
    decode_record,
    encode_frame,
    encode_record,
    scan_segment,
    segment_header,
)

MAX = 1 << 20
payload_lists = st.lists(st.binary(max_size=64), max_size=8)
first_seqs = st.integers(min_value=1, max_value=2**40)


def build(payloads, first_seq):
    data = segment_header(first_seq) + b"".join(
        encode_frame(first_seq + i, p) for i, p in enumerate(payloads))
    ends = [SEGMENT_HEADER.size]
    for p in payloads:
        ends.append(ends[-1] + FRAME_OVERHEAD + len(p))
    return data, ends


def payloads_of(scan):
    return [p for _, p in scan.records]


@given(payload_lists, first_seqs)
def test_any_sequence_of_payloads_round_trips(payloads, first_seq):
    data, ends = build(payloads, first_seq)
    scan = scan_segment(data, first_seq, MAX)
    assert scan.damage is None
    assert scan.records == [(first_seq + i, p) for i, p in enumerate(payloads)]
    assert scan.end == len(data) == ends[-1]


@given(payload_lists, first_seqs, st.data())
def test_any_truncation_yields_a_prefix_and_a_torn_tail(payloads, first_seq, data):
    raw, ends = build(payloads, first_seq)
    cut = data.draw(st.integers(min_value=0, max_value=len(raw)), label="cut")
    scan = scan_segment(raw[:cut], first_seq, MAX)
    k = sum(1 for e in ends[1:] if e <= cut)
    assert payloads_of(scan) == payloads[:k]
    if cut in ends:
        assert scan.damage is None
    else:
        assert scan.damage is not None and scan.damage.kind == "torn"
        assert scan.end == (ends[k] if cut >= SEGMENT_HEADER.size else 0)


@settings(max_examples=300)
@given(payload_lists, first_seqs, st.data())
def test_a_bit_flip_anywhere_yields_a_prefix_and_reported_damage(payloads, first_seq, data):
    raw, ends = build(payloads, first_seq)
    bit = data.draw(st.integers(min_value=0, max_value=len(raw) * 8 - 1), label="bit")
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    scan = scan_segment(bytes(flipped), first_seq, MAX)
    damaged_record = sum(1 for e in ends if e <= bit // 8) - 1  # -1: inside the header
    assert scan.damage is not None, "a flipped bit went unnoticed"
    assert payloads_of(scan) == payloads[: max(damaged_record, 0)]
    assert scan.damage.offset == (ends[damaged_record] if damaged_record >= 0 else 0)


def test_damage_followed_by_intact_records_is_reported_as_corruption():
    payloads = [bytes([i]) * 10 for i in range(6)]
    raw, ends = build(payloads, 1)
    flipped = bytearray(raw)
    flipped[ends[2] + FRAME_OVERHEAD + 3] ^= 0x10  # payload of record 3
    scan = scan_segment(bytes(flipped), 1, MAX)
    assert payloads_of(scan) == payloads[:2]
    assert scan.damage.kind == "corrupt" and "payload checksum" in scan.damage.reason
    assert scan.damage.later_seqs == (4, 6, 3)


def test_zero_filled_tail_is_torn_not_corrupt():
    raw, _ = build([b"a", b"b"], 7)
    scan = scan_segment(raw + bytes(100), 7, MAX)
    assert payloads_of(scan) == [b"a", b"b"] and scan.damage.kind == "torn"


def test_wrong_seq_and_foreign_segment_are_corrupt():
    raw, _ = build([b"a"], 5)
    assert scan_segment(raw, 6, MAX).damage.kind == "corrupt"  # header says 5, name says 6
    frames = segment_header(1) + encode_frame(1, b"x") + encode_frame(3, b"y")
    scan = scan_segment(frames, 1, MAX)
    assert payloads_of(scan) == [b"x"] and "expected 2" in scan.damage.reason


def test_a_record_longer_than_the_limit_is_refused():
    raw, _ = build([b"x" * 100], 1)
    scan = scan_segment(raw, 1, max_record_bytes=50)
    assert scan.records == [] and "max_record_bytes" in scan.damage.reason


# -- payload helpers ------------------------------------------------------------------------

numeric_dtypes = st.sampled_from(["<f4", ">f4", "<f8", "<i8", "|u1", "|b1", "<i2", "<c8"])
arrays = numeric_dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_side=5)))
metas = st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5),
                                                       st.booleans(), st.none()), max_size=4)


@given(metas, st.dictionaries(st.text(min_size=1, max_size=6), arrays, max_size=4))
def test_encode_decode_record_round_trips(meta, arrs):
    out_meta, out = decode_record(encode_record(meta, arrs))
    assert out_meta == meta and list(out) == list(arrs)
    for name, a in arrs.items():
        assert out[name].shape == a.shape and out[name].dtype == a.dtype.newbyteorder("<")
        np.testing.assert_array_equal(out[name], a)
        assert out[name].flags.writeable


@given(st.binary(max_size=200))
def test_decode_record_never_crashes_on_garbage(blob):
    try:
        decode_record(blob)
    except StateError:
        pass


def test_decode_record_refuses_object_and_lying_specs():
    with pytest.raises(StateError, match="numeric"):
        encode_record({}, {"o": np.array([object()])})
    good = encode_record({"a": 1}, {"x": np.arange(4, dtype=np.float32)})
    with pytest.raises(StateError):
        decode_record(good[:-1])
    with pytest.raises(StateError):
        decode_record(good.replace(b'"<f4"', b'"|O8"'))
    with pytest.raises(StateError, match="plain JSON"):
        encode_record({"x": float("nan")})


def _raw(header, body: bytes = b"", magic: bytes = b"RVR1") -> bytes:
    """A record payload built by hand: magic, header length, JSON header, array bytes."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<4sI", magic, len(h)) + h + body


F4 = np.arange(2, dtype="<f4").tobytes()          # 8 bytes: two float32


@pytest.mark.parametrize("payload, match", [
    (b"RVR", r"too short \(3 bytes\)"),
    (struct.pack("<4sI", b"RVR1", 0), "not valid JSON"),          # 8 bytes: long enough
    (_raw({"meta": {}, "arrays": []}, magic=b"XXXX"), "bad magic b'XXXX'"),
    (struct.pack("<4sI", b"RVR1", 999) + b"{}", "header length 999"),
    (_raw(b"{"), "not valid JSON"),
    (_raw({"meta": [], "arrays": []}), "'meta' object and an 'arrays' list"),
    (_raw({"meta": {}, "arrays": {}}), "'meta' object and an 'arrays' list"),
    (_raw({"meta": {}, "arrays": [["x", "<f4"]]}), r"spec \['x', '<f4'\] is malformed"),
    (_raw({"meta": {}, "arrays": [["x", "|O8", [1], 8]]}, F4), "'x': unsupported dtype"),
    (_raw({"meta": {}, "arrays": [["x", "<f4", [-1], 0]]}), r"shape \(-1,\)"),
    (_raw({"meta": {}, "arrays": [["x", "<f4", [2], 4]]}, F4[:4]), "4 bytes do not fit"),
    (_raw({"meta": {}, "arrays": [["x", "<f4", [2], 8]]}, F4[:4]), "8 bytes do not fit"),
    (_raw({"meta": {}, "arrays": [["x", "<f4", [2], 8]]}, F4 + b"\0"), "has 1 trailing bytes"),
], ids=["short", "empty-header", "magic", "header-length", "json", "meta", "arrays", "spec",
        "dtype", "negative-dim", "nbytes", "beyond-payload", "trailing"])
def test_decode_record_refuses_each_malformation_naming_it(payload, match):
    with pytest.raises(StateError, match=match):
        decode_record(payload)


def test_decode_record_takes_hand_built_records_and_empty_arrays():
    meta, arrays = decode_record(_raw({"meta": {"k": 1}, "arrays": [
        ["x", "<f4", [2], 8], ["e", "<i8", [0, 3], 0]]}, F4))
    assert meta == {"k": 1}
    assert arrays["x"].tolist() == [0.0, 1.0] and arrays["e"].shape == (0, 3)
