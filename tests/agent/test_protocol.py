"""Frame codecs: round trips, and every malformed payload raises ProtocolError only."""

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.errors import ProtocolError
from agent.protocol import (
    BINARY_HEADER,
    decode_frame,
    encode_event,
    encode_frame_binary,
    encode_frame_json,
    encode_prediction,
    encode_status,
)

finite_f32 = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
frames = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=32),
                    elements=finite_f32)
seqs = st.integers(0, 2**64 - 1)
tss = st.floats(0, 4e9, allow_nan=False)


@given(seq=seqs, ts=tss, values=frames)
def test_binary_round_trip(seq, ts, values):
    f = decode_frame(encode_frame_binary(seq, ts, values))
    assert (f.seq, f.ts) == (seq, ts)
    np.testing.assert_array_equal(f.values, values)


@given(seq=seqs, ts=tss, values=frames)
def test_json_round_trip(seq, ts, values):
    f = decode_frame(encode_frame_json(seq, ts, values))
    assert f.seq == seq
    assert f.ts == pytest.approx(ts)
    np.testing.assert_allclose(f.values, values, rtol=1e-6)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_protocol_error_only(payload):
    try:
        decode_frame(payload)
    except ProtocolError as exc:
        assert exc.reason and str(exc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=8)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional={
    "seq": json_values, "ts": json_values,
    "values": st.lists(st.lists(st.floats() | st.integers() | st.none(), max_size=3), max_size=3)
    | json_values, "x": json_values}))
def test_arbitrary_json_objects_raise_protocol_error_only(obj):
    payload = json.dumps(obj).encode()
    try:
        f = decode_frame(payload)
    except ProtocolError:
        return
    assert np.isfinite(f.values).all() and f.values.ndim == 2


@pytest.mark.parametrize("payload, reason, fragment", [
    (b"", "empty", "empty"),
    (b"{not json", "bad_json", "not valid JSON"),
    (b"[1, 2]", "bad_json", "JSON object"),
    (b'{"seq": 1, "ts": 0}', "missing_field", "values"),
    (b'{"seq": -1, "ts": 0, "values": [[1]]}', "bad_seq", "seq=-1"),
    (b'{"seq": true, "ts": 0, "values": [[1]]}', "bad_seq", "seq=True"),
    (b'{"seq": 1, "ts": "x", "values": [[1]]}', "bad_ts", "ts='x'"),
    (b'{"seq": 1, "ts": 0, "values": [[1, 2], [3]]}', "bad_shape", "values[1] has 1 channels"),
    (b'{"seq": 1, "ts": 0, "values": [[1, "a"]]}', "bad_value", "values[0][1]='a'"),
    (b'{"seq": 1, "ts": 0, "values": [[1, NaN]]}', "non_finite", "NaN"),
    (b'{"seq": 1, "ts": 0, "values": [[1, 1e39]]}', "non_finite", "values[0][1]"),
    (b'{"seq": 1, "ts": 0, "values": []}', "bad_shape", "non-empty"),
    (b'{"seq": 1, "ts": 0, "values": [[1]], "extra": 2}', "unknown_field", "extra"),
])
def test_malformed_json_frames_name_the_problem(payload, reason, fragment):
    with pytest.raises(ProtocolError) as info:
        decode_frame(payload)
    assert info.value.reason == reason
    assert fragment in str(info.value)


def test_binary_length_mismatch_and_nan_are_rejected():
    good = encode_frame_binary(3, 1.5, np.ones((4, 2), np.float32))
    with pytest.raises(ProtocolError, match="header says 4x2"):
        decode_frame(good[:-1])
    with pytest.raises(ProtocolError, match="shorter than the 24-byte header"):
        decode_frame(good[:10])
    bad = bytearray(good)
    struct.pack_into("<f", bad, BINARY_HEADER.size + 4, float("nan"))
    with pytest.raises(ProtocolError) as info:
        decode_frame(bytes(bad))
    assert info.value.reason == "non_finite" and "values[0][1]" in str(info.value)
    wrong_version = bytearray(good)
    wrong_version[2] = 9
    with pytest.raises(ProtocolError, match="version=9"):
        decode_frame(bytes(wrong_version))


def test_oversized_payload_is_rejected_before_parsing():
    with pytest.raises(ProtocolError) as info:
        decode_frame(b"{" + b" " * 2000 + b"}", max_bytes=1000)
    assert info.value.reason == "oversized" and "max_bytes=1000" in str(info.value)


def test_outbound_payloads_are_json():
    p = json.loads(encode_prediction(device="d", window=1, seq_first=0, seq_last=7, ts=1.0,
                                     label="a", confidence=0.9, probs={"a": 0.9, "b": 0.1},
                                     latency_ms=1.23456, model="abc"))
    assert p["label"] == "a" and p["probs"]["b"] == 0.1 and p["latency_ms"] == 1.235
    e = json.loads(encode_event(device="d", type="error", reason="bad_json", detail="x", ts=2.0,
                                topic="t"))
    assert e["reason"] == "bad_json" and e["topic"] == "t"
    assert json.loads(encode_status(state="offline"))["state"] == "offline"
    with pytest.raises(ValueError, match="Invalid status state"):
        encode_status(state="asleep")


def test_binary_frame_bytes_match_the_documented_layout():
    """docs/protocol.md "Binary": little-endian, offsets 0/2/3/4/12/20/22/24. Written out
    byte by byte, so an encoder and decoder that change endianness together still fail."""
    values = np.array([[1.0, -2.0, 0.5]], np.float32)                 # (1 sample, 3 channels)
    got = encode_frame_binary(0x0102030405060708, 1.5, values)
    want = (b"RV"                                                    # 0: magic
            + bytes([1])                                             # 2: version
            + bytes([0])                                             # 3: flags
            + bytes([0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01])  # 4: seq, uint64 LE
            + bytes([0, 0, 0, 0, 0, 0, 0xF8, 0x3F])                  # 12: ts 1.5, float64 LE
            + bytes([1, 0])                                          # 20: n_samples, uint16 LE
            + bytes([3, 0])                                          # 22: n_channels
            + bytes([0, 0, 0x80, 0x3F])                              # 24: 1.0, float32 LE
            + bytes([0, 0, 0, 0xC0])                                 #     -2.0
            + bytes([0, 0, 0, 0x3F]))                                #     0.5
    assert got == want
    frame = decode_frame(want)
    assert frame.seq == 0x0102030405060708 and frame.ts == 1.5
    assert frame.values.tolist() == values.tolist()
