"""Payload generators for ``reverie bench fuzz``: malformed frames, labels, commands and
topics, with a few valid frames and labels mixed in.

Every generated message carries the outcome the daemon must reach, worked out here with
the daemon's own decoders plus the worker's checks that follow them (`expected_outcome`):
a reason code (``bad_json``, ``bad_channels``, ``unknown_window``, ``bad_topic``, ...) for
a message it must drop, or None for one it must accept. A mutation that happens to stay
valid (a bit flip inside a float) is mutated again, so "malformed" means it: the campaign
then compares the daemon's ``reverie_dropped_total{reason}`` with these counts exactly.
Anything but ProtocolError out of a decoder is a decoder bug; it is expected here as
``internal_error`` (what the daemon's worker guard counts it as: twice for a label or
command, once by the guard and once by the rejection that follows) and listed in `bugs`.

Valid traffic is deterministic per device: one window per frame, seq 0, 1, 2, ...
(so each valid frame yields one prediction) and labels carrying an inline window of a
class of the bundle, with a unique id (so each is learned once).

Semantic hostile inputs (issue 13) are well-formed but meant to hurt: frames of huge
finite values (+-3e38, 1e7: refused by the bundle's value range, ``out_of_range``),
frames with extreme or non-monotonic timestamps on their own devices (accepted: one
prediction each), labels with emoji and 128-character ids, class floods (a new class per
label) and window-id floods (1,024 ids never produced). Their families start with
``valid_`` when the daemon must accept them (counted with the valid traffic: every one
predicted or learned), otherwise they carry the reason like the malformed ones.
"""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass

import numpy as np

from agent.errors import ProtocolError
from agent.messages import decode_command, decode_label
from agent.protocol import (
    BINARY_HEADER,
    MAX_PAYLOAD_BYTES,
    decode_frame,
    encode_frame_binary,
    encode_frame_json,
)
from agent.topics import Topics
from agent.value_range import ValueRange

VALID_TS0 = 1.7e9             # valid frames' timestamps start here; malformed ranges avoid it
SAMPLE_RATE_HZ = 50.0
MAX_COMMAND_BYTES = 4096      # what the worker passes to decode_command
# Device ids the topic parser must refuse; none holds "/", "+", "#" (they change what the
# subscription matches) or a control character (mosquitto disconnects the publisher for
# a "malformed packet": such a topic never reaches the daemon).
BAD_DEVICES = ("", ".", "..", "dev ice", "dév", "a" * 65, "x$y", "dev@1", "ü" * 20, "a*b",
               "semi;colon", "q?", "100%")


@dataclass(frozen=True)
class Message:
    kind: str              # "frames" | "labels" | "cmd"
    device: str            # as it appears in the topic (may be invalid)
    payload: bytes
    qos: int
    family: str            # the generator that made it
    expect: str | None     # the drop reason the daemon must count; None: accepted


@dataclass(frozen=True)
class Spec:
    """What the served bundle takes, and the label names it knows."""

    n_channels: int
    window: int
    classes: tuple[str, ...]
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    value_range: ValueRange | None = None      # the daemon's (agent/value_range.py)


def expected_outcome(kind: str, device: str, payload: bytes, spec: Spec, prefix: str
                     ) -> str | None:
    """The reason the daemon drops this message for, or None if it accepts it; raises
    `Uncertain` when the outcome depends on the daemon's history (a label naming windows
    that may exist). Mirrors agent/worker.py after each decoder."""
    try:
        Topics("+", prefix).parse(f"{prefix}/{device}/{kind}")
    except ValueError:
        return "bad_topic"
    try:
        if kind == "frames":
            frame = decode_frame(payload, max_bytes=spec.max_payload_bytes)
            if frame.n_channels != spec.n_channels:
                return "bad_channels"
            if spec.value_range is not None:
                spec.value_range.check(frame.values, "frame")
            return None
        if kind == "cmd":
            decode_command(payload, max_bytes=MAX_COMMAND_BYTES)
            return None
        label = decode_label(payload, max_bytes=spec.max_payload_bytes)
    except ProtocolError as exc:
        return exc.reason
    except Exception:  # noqa: BLE001 - a decoder bug: the worker's guard counts it so
        return "internal_error"
    if label.values is not None:
        if label.values.shape != (spec.window, spec.n_channels):
            return "bad_shape"
        if spec.value_range is not None:
            try:
                spec.value_range.check(label.values, "label")
            except ProtocolError as exc:
                return exc.reason
        return None
    if label.windows:
        if min(label.windows) >= 2**40:        # no daemon in a campaign gets that far
            return "unknown_window"
        raise Uncertain("label names windows that may exist")
    if label.to_ts < VALID_TS0 - 86_400 or label.from_ts > VALID_TS0 + 10 * 86_400:
        return "unknown_window"
    raise Uncertain("label's time range may hold windows")


class Uncertain(Exception):
    """The outcome depends on the daemon's state: the generator draws again."""


# ---------------------------------------------------------------------- generators


def _values(rng: random.Random, samples: int, channels: int) -> np.ndarray:
    return np.asarray([[rng.uniform(-4, 4) for _ in range(channels)] for _ in range(samples)],
                      dtype=np.float32)


def _frame(rng: random.Random, spec: Spec, *, binary: bool, samples: int = 4,
           channels: int | None = None) -> bytes:
    vals = _values(rng, samples, channels or spec.n_channels)
    enc = encode_frame_binary if binary else encode_frame_json
    return enc(rng.randrange(2**32), VALID_TS0 + rng.random() * 1e3, vals)


def _flip(rng: random.Random, data: bytes, n: int) -> bytes:
    b = bytearray(data)
    for _ in range(n):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _nest(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * depth + close * depth).encode()


def bad_frame(rng: random.Random, spec: Spec) -> tuple[str, bytes]:
    """(family, payload) of one frame that is malformed in one of many ways."""
    c = spec.n_channels
    good = _frame(rng, spec, binary=True)
    header = BINARY_HEADER.unpack_from(good)
    pick = rng.randrange(20)
    if pick == 0:
        return "random_bytes", rng.randbytes(rng.randrange(0, 300))
    if pick == 1:
        return "truncated_binary", good[:rng.randrange(len(good))]
    if pick == 2:
        return "bitflip_binary", _flip(rng, good, rng.randint(1, 8))
    if pick == 3:
        return "bitflip_json", _flip(rng, _frame(rng, spec, binary=False), rng.randint(1, 8))
    if pick == 4:
        return "truncated_json", (b := _frame(rng, spec, binary=False))[:rng.randrange(len(b))]
    if pick == 5:
        version = rng.choice([0, 2, 7, 255])
        return "bad_version", BINARY_HEADER.pack(b"RV", version, *header[2:]) + good[24:]
    if pick == 6:
        n_s, n_c = rng.randrange(65536), rng.randrange(65536)
        return "bad_sizes", BINARY_HEADER.pack(b"RV", 1, 0, header[3], header[4], n_s, n_c) \
            + good[24:]
    if pick == 7:
        return "bad_flags", BINARY_HEADER.pack(b"RV", 1, rng.randint(1, 255), *header[3:]) \
            + good[24:]
    if pick == 8:
        bad = rng.choice([float("nan"), float("inf"), -float("inf")])
        body = bytearray(good)
        struct.pack_into("<f", body, 24 + 4 * rng.randrange(4 * c), bad)
        return "nonfinite_binary", bytes(body)
    if pick == 9:
        const = rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
        row = ",".join(["0.5"] * (c - 1) + [const])
        return "nonfinite_json", f'{{"seq":1,"ts":{VALID_TS0},"values":[[{row}]]}}'.encode()
    if pick == 10:
        seq, ts = rng.choice([(-1, 1.0), (2**64, 1.0), ("1", 1.0), (1.5, 1.0), (True, 1.0),
                              (1, "now"), (1, None), (1, [1]), (10**30, 1e400)])
        body = {"seq": seq, "ts": ts, "values": [[0.0] * c]}
        return "wrong_types", json.dumps(body).encode().replace(b"Infinity", b"1e400")
    if pick == 11:
        values = rng.choice([[], [[]], [[1.0] * c, [1.0]], [["x"] * c], [[None] * c],
                             [[True] * c], {"a": 1}, "values", [[[1.0]] * c], [1.0] * c])
        return "bad_values", _json({"seq": 1, "ts": VALID_TS0, "values": values})
    if pick == 12:
        big = rng.choice(["1e39", "3.5e38", "-1e300", "9" * 400])
        row = ",".join([big] * c)
        return "huge_numbers", f'{{"seq":1,"ts":{VALID_TS0},"values":[[{row}]]}}'.encode()
    if pick == 13:
        depth = rng.choice([50, 1000, 5000, 20000])
        inner = _nest(depth)
        return "deep_nesting", (b'{"seq":1,"ts":1,"values":' + inner + b"}"
                                if rng.random() < 0.5 else inner)
    if pick == 14:
        channels = rng.choice([k for k in (1, 2, 3, 5, 7, 8, 12, 64, 256) if k != c])
        return "wrong_channels", _frame(rng, spec, binary=rng.random() < 0.5,
                                        channels=channels)
    if pick == 15:
        return "missing_field", _json(rng.choice([{"seq": 1, "ts": 1.0}, {"values": [[1.0]]},
                                                  {}, {"seq": 1, "values": [[1.0] * c]}]))
    if pick == 16:
        return "unknown_field", _json({"seq": 1, "ts": 1.0, "values": [[1.0] * c], "x": 1})
    if pick == 17:
        return "not_object", rng.choice([b"[]", b"1", b'"frame"', b"null", b"true", b"{",
                                         b"\xff\xfe{", "{\"seq\":\u00e9}".encode("latin-1")])
    if pick == 18 and rng.random() < 0.05:       # oversized payloads are costly: rare
        return "oversized", b"RV" + b"\0" * (spec.max_payload_bytes + rng.randrange(1, 64))
    if pick == 18:
        return "empty", b""
    return "header_only", good[:24]


def bad_label(rng: random.Random, spec: Spec) -> tuple[str, bytes]:
    """(family, payload) of one label that is malformed, or names a target that is not
    there (windows never produced, a time range with no window)."""
    c, w = spec.n_channels, spec.window
    name = rng.choice(spec.classes)
    far = 2**40 + rng.randrange(2**20)
    pick = rng.randrange(16)
    if pick == 0:
        return "random_bytes", rng.randbytes(rng.randrange(0, 200))
    if pick == 1:
        good = _json({"id": f"x{rng.randrange(10**9)}", "label": name, "window": far})
        return "bitflip_json", _flip(rng, good, rng.randint(1, 6))
    if pick == 2:
        return "bad_label_name", _json({"label": rng.choice(["", "x" * 65, 7, None, ["a"],
                                                             "tab\there", "\x00"]),
                                        "window": far})
    if pick == 3:
        return "bad_target", _json(rng.choice([{"label": name}, {"label": name, "window": 1,
                                               "windows": [1]}, {"label": name, "window": 1,
                                               "from_ts": 1.0, "to_ts": 2.0}]))
    if pick == 4:
        return "bad_window", _json({"label": name, "window": rng.choice(
            [-1, 1.5, "3", True, None, [1], 2**62, 2**70])})
    if pick == 5:
        return "bad_windows", _json({"label": name, "windows": rng.choice(
            [[], "1", [-1], [1, "2"], list(range(1025)), {"a": 1}, [None]])})
    if pick == 6:
        return "bad_range", _json(rng.choice([
            {"label": name, "from_ts": 10.0, "to_ts": 5.0},
            {"label": name, "from_ts": 0.0, "to_ts": 1e6},
            {"label": name, "to_ts": 5.0},
            {"label": name, "from_ts": 5.0},
            {"label": name, "from_ts": "a", "to_ts": 5.0},
            {"label": name, "from_ts": None, "to_ts": 5.0}]))
    if pick == 7:
        const = rng.choice(["NaN", "Infinity", "-Infinity"])
        return "nonfinite", f'{{"label":"{name}","from_ts":{const},"to_ts":1.0}}'.encode()
    if pick == 8:
        rows = rng.choice([[[1.0] * c] * (w - 1), [[1.0] * (c + 1)] * w, [[1.0] * c] * (w + 3),
                           [[1.0]]])
        return "wrong_window_shape", _json({"label": name, "values": rows})
    if pick == 9:
        rows = [[0.5] * c for _ in range(w)]
        rows[rng.randrange(w)][rng.randrange(c)] = "NaN"
        return "nonfinite_values", json.dumps({"label": name, "values": rows}).replace(
            '"NaN"', rng.choice(["NaN", "1e400", "null", '"x"', "true"])).encode()
    if pick == 10:
        return "unknown_window", _json({"id": f"u{rng.randrange(10**12)}", "label": name,
                                        "windows": [far, far + 1]})
    if pick == 11:
        lo = rng.uniform(0, 1e6)
        return "no_window_in_range", _json({"label": name, "from_ts": lo, "to_ts": lo + 5})
    if pick == 12:
        return "deep_nesting", _json({"label": name}).replace(
            b"}", b',"window":' + _nest(rng.choice([100, 5000, 30000])) + b"}")
    if pick == 13:
        return "unknown_field", _json({"label": name, "window": far, "extra": 1})
    if pick == 14:
        return "bad_id", _json({"id": rng.choice(["", "i" * 129, 5, ["a"], "\x07"]),
                                "label": name, "window": far})
    return "not_object", rng.choice([b"[]", b"3", b"null", b'"wave"', b"", b"\xc3\x28"])


def bad_command(rng: random.Random) -> tuple[str, bytes]:
    """(family, payload) of one command the decoder refuses."""
    pick = rng.randrange(9)
    if pick == 0:
        return "random_bytes", rng.randbytes(rng.randrange(0, 100))
    if pick == 1:
        return "unknown_command", _json({"id": "c", "cmd": rng.choice(
            ["reboot", "", "SLEEP", None, 1, ["sleep"], {"a": 1}, "rm -rf /"])})
    if pick == 2:
        return "bad_budget", (b'{"cmd":"sleep","budget_s":' + rng.choice(
            [b"0", b"-1", b"3601", b"NaN", b"Infinity", b'"10"', b"true", b"1e400"]) + b"}")
    if pick == 3:
        return "bad_to_version", _json({"cmd": "rollback", "to_version": rng.choice(
            [-1, 1.5, "0", True])})
    if pick == 4:
        return "unknown_field", _json({"cmd": "status", "x": 1})
    if pick == 5:
        return "bad_id", _json({"cmd": "status", "id": rng.choice(["", "i" * 129, 3, "\x01"])})
    if pick == 6:
        return "oversized", b'{"cmd":"status","id":"' + b"a" * 5000 + b'"}'
    if pick == 7:
        return "deep_nesting", _nest(rng.choice([100, 10000]), "{\"a\":", "}")
    return "not_object", rng.choice([b"[]", b"null", b"sleep", b"", b"\xff"])


class Campaign:
    """Draws the campaign's messages from one seed: ``next()`` gives a `Message`.

    ``valid_fraction`` of them are valid frames (mostly) and labels of `valid_devices`,
    the rest malformed: frames, labels and commands to those and to `extra_devices`, and
    a few to topics with invalid device ids.
    """

    def __init__(self, spec: Spec, prefix: str, *, seed: int = 0, valid_devices: int = 4,
                 extra_devices: int = 32, valid_fraction: float = 0.04,
                 semantic_fraction: float = 0.02, new_class_quota: int | None = None):
        self.spec, self.prefix = spec, prefix
        self.rng = random.Random(seed)
        self.valid = [f"fuzz-{k:03d}" for k in range(valid_devices)]
        self.devices = self.valid + [f"fz-{k:03d}" for k in range(extra_devices)]
        self.semantic = [f"sem-{k:03d}" for k in range(2)]    # extreme timestamps live here
        self.valid_fraction = valid_fraction
        self.semantic_fraction = semantic_fraction
        self._seq = dict.fromkeys(self.valid + self.semantic, 0)
        self._ts = dict.fromkeys(self.semantic, VALID_TS0)
        self._label_id = 0
        self._flood = 0
        # new classes the (shared) learner accepts in a campaign (its class quotas); a
        # class-flood label beyond is refused (bad_label)
        self.new_class_quota = new_class_quota
        self.bugs: list[Message] = []       # messages a decoder failed on unexpectedly
        self.learned_keys: list[str] = []   # label keys the daemon must hold at the end

    def valid_frame(self) -> Message:
        rng, spec = self.rng, self.spec
        device = rng.choice(self.valid)
        seq = self._seq[device]
        self._seq[device] += 1
        ts = VALID_TS0 + seq * spec.window / SAMPLE_RATE_HZ
        vals = _values(rng, spec.window, spec.n_channels)      # (window, C): one window
        enc = encode_frame_binary if rng.random() < 0.7 else encode_frame_json
        return Message("frames", device, enc(seq, ts, vals), 0, "valid_frame", None)

    def valid_label(self) -> Message:
        rng, spec = self.rng, self.spec
        self._label_id += 1
        rows = np.round(_values(rng, spec.window, spec.n_channels), 4).tolist()
        body = {"id": f"fuzz-label-{self._label_id}", "label": rng.choice(spec.classes),
                "values": rows}
        device = rng.choice(self.valid)
        self.learned_keys.append(f"{device}/{body['id']}")
        return Message("labels", device, _json(body), 1, "valid_label", None)

    def semantic_message(self) -> Message:
        """One well-formed hostile message (see the module docstring)."""
        rng, spec = self.rng, self.spec
        pick = rng.randrange(5)
        if pick == 0 and spec.value_range is not None:      # huge finite values
            vals = _values(rng, spec.window, spec.n_channels)
            vals[rng.randrange(spec.window), rng.randrange(spec.n_channels)] = rng.choice(
                [3e38, -3e38, 1e7, -1e7])
            device = rng.choice(self.devices)
            payload = encode_frame_binary(rng.randrange(2**32), VALID_TS0, vals)
            return self._checked("frames", device, payload, 0, "huge_finite_values")
        if pick <= 1:                                       # extreme, non-monotonic ts
            device = rng.choice(self.semantic)
            ts = rng.choice([0.0, -1e9, 1e15, 4e9, self._ts[device] - rng.uniform(1, 1e6),
                             self._ts[device]])
            vals = _values(rng, spec.window, spec.n_channels)
            payload = encode_frame_binary(self._seq[device], ts, vals)
            msg = self._checked("frames", device, payload, 0, "valid_frame_extreme_ts")
            if msg.expect is None:                          # consumed: next seq
                self._seq[device] += 1
                self._ts[device] = ts
            return msg
        rows = np.round(_values(rng, spec.window, spec.n_channels), 4).tolist()
        device = rng.choice(self.valid)
        self._label_id += 1
        if pick == 2:                                       # emoji / long ids
            stem = rng.choice(["\U0001F600", "\u00e9", "x", "\u4e2d"])
            ident = (stem * 128)[:120] + f"{self._label_id:08d}"
            body = {"id": ident, "label": rng.choice(spec.classes), "values": rows}
            family = "valid_label_long_id"
        elif pick == 3:                                     # class flood
            self._flood += 1
            body = {"id": f"flood-{self._label_id}", "label": f"flood-class-{self._flood}",
                    "values": rows}
            family = "valid_label_class_flood"
        else:                                               # window-id flood
            far = 2**41 + rng.randrange(2**30)
            body = {"id": f"wflood-{self._label_id}", "label": rng.choice(spec.classes),
                    "windows": list(range(far, far + 1024))}
            family = "window_id_flood"
        msg = self._checked("labels", device, _json(body), 1, family)
        if msg.expect is None and pick == 3 and self.new_class_quota is not None \
                and self._flood > self.new_class_quota:
            msg = Message("labels", device, msg.payload, 1, "label_class_flood", "bad_label")
        if msg.expect is None:
            self.learned_keys.append(f"{device}/{body['id']}")
        return msg

    def _checked(self, kind: str, device: str, payload: bytes, qos: int,
                 family: str) -> Message:
        expect = expected_outcome(kind, device, payload, self.spec, self.prefix)
        if expect is not None and family.startswith("valid_"):
            family = family.removeprefix("valid_")          # refused: counted as a drop
        return Message(kind, device, payload, qos, family, expect)

    def valid_command(self) -> Message:
        return Message("cmd", self.rng.choice(self.valid), _json({"cmd": "status"}), 1,
                       "valid_command", None)

    def malformed(self) -> Message:
        rng = self.rng
        while True:
            r = rng.random()
            kind = "frames" if r < 0.6 else "labels" if r < 0.85 else "cmd"
            if rng.random() < 0.05:
                device, family = rng.choice(BAD_DEVICES), "bad_topic"
                payload = _frame(rng, self.spec, binary=True)
            else:
                device = rng.choice(self.devices)
                family, payload = (bad_frame(rng, self.spec) if kind == "frames" else
                                   bad_label(rng, self.spec) if kind == "labels" else
                                   bad_command(rng))
            try:
                expect = expected_outcome(kind, device, payload, self.spec, self.prefix)
            except Uncertain:
                continue
            if expect is None:              # the mutation stayed valid: draw again
                continue
            msg = Message(kind, device, payload, rng.choice((0, 1)), family, expect)
            if expect == "internal_error":
                self.bugs.append(msg)
            return msg

    def next(self) -> Message:
        r = self.rng.random()
        if r >= self.valid_fraction + self.semantic_fraction:
            return self.malformed()
        if r >= self.valid_fraction:
            return self.semantic_message()
        r /= self.valid_fraction
        return (self.valid_frame() if r < 0.8 else self.valid_label() if r < 0.95
                else self.valid_command())
