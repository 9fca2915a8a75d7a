"""Label and command decoders: every input either decodes or raises ProtocolError."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ProtocolError
from agent.messages import decode_command, decode_label, encode_reply

MAX = 64 * 1024


def test_label_targets():
    assert decode_label(b'{"id": "a", "label": "x", "window": 3}', max_bytes=MAX).windows == (3,)
    lab = decode_label(b'{"label": "x", "windows": [3, 4, 3]}', max_bytes=MAX)
    assert lab.windows == (3, 4) and lab.id.startswith("sha1:")
    lab = decode_label(b'{"label": "x", "from_ts": 1, "to_ts": 2.5}', max_bytes=MAX)
    assert (lab.from_ts, lab.to_ts, lab.target) == (1.0, 2.5, "time range")
    lab = decode_label(json.dumps({"label": "x", "values": [[1, 2], [3, 4]]}).encode(),
                       max_bytes=MAX)
    assert lab.values.dtype == np.float32 and lab.values.shape == (2, 2)


def test_the_payload_hash_is_a_stable_id():
    a = decode_label(b'{"label": "x", "window": 1}', max_bytes=MAX)
    b = decode_label(b'{"label": "x", "window": 1}', max_bytes=MAX)
    c = decode_label(b'{"label": "x", "window": 2}', max_bytes=MAX)
    assert a.id == b.id != c.id


@pytest.mark.parametrize("payload, reason, names", [
    (b"", "empty", "empty"),
    (b"[1]", "bad_json", "list"),
    (b'{"label": "x", "window": 1, "values": [[1]]}', "bad_target", "window"),
    (b'{"label": "x", "to_ts": 1}', "missing_field", "to_ts"),
    (b'{"label": "x", "from_ts": 1}', "missing_field", "to_ts"),
    (b'{"label": "x", "windows": []}', "bad_window", "windows"),
    (b'{"label": "x", "windows": [1, true]}', "bad_window", "windows[1]"),
    (b'{"label": 3, "window": 1}', "bad_label", "label=3"),
    (b'{"id": "", "label": "x", "window": 1}', "bad_id", "id=''"),
    (b'{"label": "x", "from_ts": 0, "to_ts": 1e9}', "bad_range", "span"),
    (b'{"label": "x", "values": [[1, 2], [1]]}', "bad_shape", "values[1]"),
    (b'{"label": "x", "values": [["a"]]}', "bad_value", "values[0][0]"),
    (b'{"label": "x", "values": [[1e39]]}', "non_finite", "not finite"),
    (b'{"label": "x", "window": 1, "ts": "now"}', "bad_ts", "ts='now'"),
])
def test_bad_labels_name_the_problem(payload, reason, names):
    with pytest.raises(ProtocolError) as exc:
        decode_label(payload, max_bytes=MAX)
    assert exc.value.reason == reason and names in str(exc.value)


def test_oversized_label():
    with pytest.raises(ProtocolError, match="max_bytes=10"):
        decode_label(b'{"label": "x", "window": 1}', max_bytes=10)


def test_commands():
    c = decode_command(b'{"id": "c1", "cmd": "sleep", "budget_s": 30}')
    assert (c.id, c.cmd, c.budget_s) == ("c1", "sleep", 30.0)
    assert decode_command(b'{"cmd": "rollback", "to_version": 0}').to_version == 0
    for payload, reason in [(b'{"cmd": "reboot"}', "unknown_command"),
                            (b'{"cmd": "sleep", "budget_s": -1}', "bad_budget_s"),
                            (b'{"cmd": "rollback", "to_version": 1.5}', "bad_to_version"),
                            (b'{"cmd": "status", "x": 1}', "unknown_field")]:
        with pytest.raises(ProtocolError) as exc:
            decode_command(payload)
        assert exc.value.reason == reason
    body = json.loads(encode_reply(id="c", cmd="status", ok=True, ts=1.0, status={"a": 1}))
    assert body == {"v": 1, "id": "c", "cmd": "status", "ok": True, "ts": 1.0, "status": {"a": 1}}


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(
                         st.sampled_from(["id", "label", "window", "windows", "from_ts", "to_ts",
                                          "values", "ts", "cmd", "budget_s", "to_version", "x"]),
                         c, max_size=5), max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=200), _json.map(lambda v: json.dumps(v).encode())))
def test_decoders_raise_only_protocol_errors(payload):
    for decode in (lambda p: decode_label(p, max_bytes=MAX), decode_command):
        try:
            decode(payload)
        except ProtocolError as exc:
            assert exc.reason and str(exc)


@pytest.mark.parametrize("payload, reason", [
    (b'{"label": "x", "window": 1, "ts": 1' + b"0" * 400 + b"}", "bad_ts"),
    (b'{"label": "x", "values": [[1' + b"0" * 400 + b"]]}", "non_finite"),
    (b'{"label": "x", "window": 1' + b"0" * 400 + b"}", "bad_window"),
    (b'{"cmd": "sleep", "budget_s": 1' + b"0" * 400 + b"}", "bad_budget_s"),
])
def test_huge_json_integers_are_protocol_errors(payload, reason):
    decode = decode_command if b"cmd" in payload else (lambda p: decode_label(p, max_bytes=MAX))
    with pytest.raises(ProtocolError) as exc:
        decode(payload)
    assert exc.value.reason == reason


def test_huge_integers_in_frames_are_protocol_errors():
    from agent.protocol import decode_frame

    for payload, reason in [(b'{"seq": 1, "ts": 1' + b"0" * 400 + b', "values": [[1]]}', "bad_ts"),
                            (b'{"seq": 1, "ts": 0, "values": [[1' + b"0" * 400 + b"]]}",
                             "non_finite")]:
        with pytest.raises(ProtocolError) as exc:
            decode_frame(payload)
        assert exc.value.reason == reason
