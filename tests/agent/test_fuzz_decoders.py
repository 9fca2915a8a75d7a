"""Structure-aware fuzzing of the wire decoders: frames, labels, commands.

tests/agent/test_protocol.py and test_messages.py already throw arbitrary bytes and
arbitrary JSON at them; here the inputs are *near* valid (bit flips, truncations and
splices of real encodings; the real field names with values of every JSON type), which
is where a decoder's checks run deepest. The contract: decode, or raise ProtocolError
with a reason code -- never anything else. The campaign generators of ``reverie bench
fuzz`` are checked too: every message they call malformed is refused for that reason.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.bench.fuzz_payloads import Campaign, Spec, bad_command, bad_frame, bad_label
from agent.errors import ProtocolError
from agent.messages import decode_command, decode_label
from agent.protocol import decode_frame, encode_frame_binary, encode_frame_json

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPEC = Spec(n_channels=6, window=16, classes=("idle", "walk", "run"))


def _refused_or_decoded(decode, payload: bytes, **kw):
    try:
        return decode(payload, **kw)
    except ProtocolError as exc:
        assert exc.reason and str(exc), payload[:80]
        return None


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    """ops: (kind, position, value) -> flip a bit, truncate, insert, delete, duplicate."""
    b = bytearray(data)
    for kind, pos, val in ops:
        if not b:
            break
        i = pos % len(b)
        if kind == 0:
            b[i] ^= 1 << (val % 8)
        elif kind == 1:
            del b[i:]
        elif kind == 2:
            b.insert(i, val % 256)
        elif kind == 3:
            del b[i]
        else:
            b[i:i] = b[i:i + 1 + val % 16]
    return bytes(b)


_ops = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2**16), st.integers(0, 255)),
                min_size=1, max_size=6)
_vals = st.builds(lambda s, c, seed: np.random.default_rng(seed).normal(size=(s, c))
                  .astype(np.float32), st.integers(1, 8), st.integers(1, 8), st.integers(0, 99))


@FUZZ
@given(values=_vals, seq=st.integers(0, 2**64 - 1), ops=_ops, binary=st.booleans())
def test_mutated_frames_decode_or_raise_protocol_error(values, seq, ops, binary):
    enc = encode_frame_binary if binary else encode_frame_json
    frame = _refused_or_decoded(decode_frame, _mutate(enc(seq, 1.7e9, values), ops))
    if frame is not None:                      # whatever decodes is a valid frame
        assert frame.values.dtype == np.float32 and np.isfinite(frame.values).all()
        assert frame.values.ndim == 2 and min(frame.values.shape) >= 1


_any_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=10)
_frame_fields = st.fixed_dictionaries(
    {}, optional={"seq": _any_json | st.integers(0, 2**64), "ts": _any_json,
                  "values": _any_json | st.lists(st.lists(_any_json, max_size=4), max_size=4),
                  "extra": _any_json})


@FUZZ
@given(obj=_frame_fields)
def test_frame_fields_of_any_type(obj):
    _refused_or_decoded(decode_frame, json.dumps(obj).encode())


_label_fields = st.fixed_dictionaries(
    {}, optional={"id": _any_json, "label": _any_json | st.sampled_from(["wave", "x" * 65]),
                  "window": _any_json | st.integers(-1, 2**63),
                  "windows": _any_json | st.lists(st.integers(-5, 2**63), max_size=5),
                  "from_ts": _any_json, "to_ts": _any_json, "ts": _any_json,
                  "values": _any_json | st.lists(st.lists(st.floats(), max_size=3), max_size=3),
                  "bogus": _any_json})


@FUZZ
@given(obj=_label_fields, max_bytes=st.sampled_from([64, 4096]))
def test_label_fields_of_any_type(obj, max_bytes):
    label = _refused_or_decoded(decode_label, json.dumps(obj).encode(), max_bytes=max_bytes)
    if label is not None:
        assert isinstance(label.label, str) and label.label
        assert label.values is None or np.isfinite(label.values).all()


@FUZZ
@given(ops=_ops, target=st.sampled_from(["window", "windows", "range", "values"]))
def test_mutated_labels(ops, target):
    body = {"id": "L1", "label": "wave", "ts": 1.0}
    body.update({"window": {"window": 41}, "windows": {"windows": [41, 42]},
                 "range": {"from_ts": 1.0, "to_ts": 2.0},
                 "values": {"values": [[0.5, 1.5], [2.5, 3.5]]}}[target])
    _refused_or_decoded(decode_label, _mutate(json.dumps(body).encode(), ops), max_bytes=4096)


_cmd_fields = st.fixed_dictionaries(
    {}, optional={"id": _any_json, "cmd": _any_json | st.sampled_from(
        ["sleep", "snapshot", "rollback", "status"]), "budget_s": _any_json,
        "to_version": _any_json | st.integers(-2, 2**70), "x": _any_json})


@FUZZ
@given(obj=_cmd_fields, ops=st.none() | _ops)
def test_command_fields_and_mutations(obj, ops):
    payload = json.dumps(obj).encode()
    _refused_or_decoded(decode_command, _mutate(payload, ops) if ops else payload)


@pytest.mark.parametrize("payload", [
    b"[" * 100_000, b"{" * 100_000, b'{"values":' + b"[" * 50_000,
    b'{"seq":1,"ts":1,"values":[[' + b"9" * 5000 + b"]]}", b"\xed\xa0\x80", b"{\x00}",
    b'{"seq":1,"ts":1,"values":[[1e400]]}', b'{"seq":1e400,"ts":1,"values":[[1]]}',
])
@pytest.mark.parametrize("decode", [decode_frame, decode_label, decode_command])
def test_pathological_json(decode, payload):
    kw = {} if decode is decode_frame else {"max_bytes": 10**6}
    _refused_or_decoded(decode, payload, **kw)


def test_label_null_from_ts_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        decode_label(b'{"label":"a","from_ts":null,"to_ts":1}', max_bytes=4096)


def test_campaign_malformed_messages_are_refused():
    """What `bench fuzz` sends as malformed is refused: by the decoder, or (reason
    bad_channels / bad_shape / unknown_window / bad_topic) by the daemon's checks after it.
    The raw generators may produce a valid mutation; the campaign draws again then."""
    camp = Campaign(SPEC, "p", seed=7)
    reasons = set()
    for _ in range(1500):
        m = camp.malformed()
        reasons.add(m.expect)
        if m.expect == "bad_topic":
            continue
        decode = {"frames": decode_frame, "labels": decode_label, "cmd": decode_command}[m.kind]
        kw = {"max_bytes": 4096 if m.kind == "cmd" else SPEC.max_payload_bytes}
        try:
            out = decode(m.payload, **kw)
        except ProtocolError as exc:
            assert exc.reason == m.expect
            continue
        if m.kind == "frames":
            assert m.expect == "bad_channels" and out.n_channels != 6
        else:
            assert m.kind == "labels" and m.expect in ("bad_shape", "unknown_window")
            assert (out.values is not None and out.values.shape != (SPEC.window, 6)
                    or out.windows and min(out.windows) >= 2**40
                    or out.from_ts is not None and out.to_ts < 1.6e9), m.payload[:80]
    assert {"bad_json", "bad_binary", "non_finite", "bad_channels", "unknown_window",
            "bad_topic", "oversized", "unknown_command"} <= reasons


def test_raw_generators_are_mostly_malformed():
    rng = random.Random(1)
    valid = 0
    for _ in range(300):
        frame = _refused_or_decoded(decode_frame, bad_frame(rng, SPEC)[1])
        valid += frame is not None and frame.n_channels == SPEC.n_channels
        valid += _refused_or_decoded(decode_command, bad_command(rng)[1]) is not None
        _refused_or_decoded(decode_label, bad_label(rng, SPEC)[1], max_bytes=10**6)
    assert valid < 30


def test_campaign_is_seeded_and_its_valid_messages_are_valid():
    a = [Campaign(SPEC, "p", seed=3).next() for _ in range(1)]
    c1, c2 = Campaign(SPEC, "p", seed=3), Campaign(SPEC, "p", seed=3)
    m1, m2 = [c1.next() for _ in range(300)], [c2.next() for _ in range(300)]
    assert m1 == m2 and a[0] == m1[0]
    frames = [m for m in m1 if m.family == "valid_frame"]
    assert frames and all(decode_frame(m.payload).values.shape == (16, 6) for m in frames)
    for m in (c1.valid_label(), c1.valid_label()):
        assert decode_label(m.payload, max_bytes=10**6).values.shape == (16, 6)
    assert all(m.expect is not None for m in m1 if not m.family.startswith("valid_"))
