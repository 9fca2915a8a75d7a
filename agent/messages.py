"""Labels and commands: the daemon's inbound control messages (docs/protocol.md).

Labels (``{prefix}/{device}/labels``, QoS 1) name what a stretch of the device's stream
was, after the fact. Exactly one target per label:

* ``{"id": "L1", "label": "wave", "window": 41}``                 one window (its id in predictions)
* ``{"id": "L2", "label": "wave", "windows": [41, 42, 43]}``      several windows
* ``{"id": "L3", "label": "wave", "from_ts": 1732790100.0, "to_ts": 1732790104.0}``
  every window whose first sample's timestamp lies in ``[from_ts, to_ts]``
* ``{"id": "L4", "label": "wave", "values": [[...], ...]}``       a labelled window, inline
  (``window_samples x n_channels``, like a frame's values)

``id`` (optional, 1-128 characters) deduplicates redelivered labels; without one, the
payload's hash is the id. Commands (``{prefix}/{device}/cmd``)::

    {"id": "c1", "cmd": "sleep", "budget_s": 30}
    {"id": "c2", "cmd": "snapshot"}
    {"id": "c3", "cmd": "rollback"}            # or "to_version": 0 (the bundle's own head)
    {"id": "c4", "cmd": "status"}

Every decoding failure raises ProtocolError with a stable reason code and a message
naming the bad field, like the frame decoder.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from agent.errors import ProtocolError
from agent.protocol import checked_bytes, finite_number, load_json_object, values_from_json

MAX_LABEL_CHARS = 64
MAX_ID_CHARS = 128
MAX_WINDOWS_PER_LABEL = 1024
MAX_LABEL_SPAN_S = 86_400.0
COMMANDS = ("sleep", "snapshot", "rollback", "status")


@dataclass(frozen=True)
class LabelMsg:
    id: str
    label: str
    windows: tuple[int, ...] = ()
    from_ts: float | None = None
    to_ts: float | None = None
    values: np.ndarray | None = None   # (samples, channels) float32, inline window
    ts: float | None = None

    @property
    def target(self) -> str:
        if self.values is not None:
            return "values"
        return "windows" if self.windows else "time range"


@dataclass(frozen=True)
class CommandMsg:
    id: str
    cmd: str
    budget_s: float | None = None
    to_version: int | None = None
    ts: float | None = None          # signed commands: when it was issued (epoch seconds)
    sig: str | None = None           # hex HMAC-SHA256 of `signed_message(body, topic, agent)`
    body: bytes = b""                # the canonical JSON of the command without "sig"
    nonce: str | None = None         # signed commands: used once (the agent remembers it)

    @property
    def changes_state(self) -> bool:
        return self.cmd in STATE_CHANGING


STATE_CHANGING = ("sleep", "snapshot", "rollback")
SIGNATURE_DOMAIN = b"reverie-command-v2"
NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def canonical_command(body: dict) -> bytes:
    """The JSON object without "sig", keys sorted, no spaces
    (``json.dumps(body, sort_keys=True, separators=(",", ":"))``)."""
    return json.dumps({k: v for k, v in body.items() if k != "sig"}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode()


def signed_message(canonical_body: bytes, *, topic: str, agent: str) -> bytes:
    """What a command signature covers: a domain tag, the topic the command is published
    on, the agent id it is meant for and the canonical body (which holds ``ts`` and
    ``nonce``), joined by newlines. A copy published on another topic or to another agent
    does not verify."""
    return b"\n".join((SIGNATURE_DOMAIN, topic.encode(), agent.encode(), canonical_body))


def sign_command(body: dict, key: bytes, *, topic: str, agent: str) -> dict:
    """`body` with ``"sig"`` added (and ``"ts"``/``"nonce"`` when missing), for operators'
    tools and tests.

    >>> cmd = sign_command({"id": "c7", "cmd": "snapshot"}, b"k" * 32,
    ...                    topic="reverie/v1/gateway/cmd", agent="gateway")
    >>> sorted(cmd)
    ['cmd', 'id', 'nonce', 'sig', 'ts']
    """
    import hmac
    import secrets
    import time

    body = {"ts": time.time(), "nonce": secrets.token_hex(16), **body}
    mac = hmac.new(key, signed_message(canonical_command(body), topic=topic, agent=agent),
                   "sha256").hexdigest()
    return {**body, "sig": mac}


def _load(payload: bytes, what: str, max_bytes: int) -> dict:
    return load_json_object(checked_bytes(payload, what, max_bytes), what)


def _text(obj: dict, key: str, what: str, max_chars: int, *, required: bool) -> str | None:
    v = obj.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v or len(v) > max_chars or not v.isprintable():
        raise ProtocolError(f"bad_{key}", f"{what} {key}={v!r}: expected a printable string of "
                            f"1-{max_chars} characters")
    return v


def _number(obj: dict, key: str, what: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not finite_number(v):
        shown = repr(v) if not isinstance(v, int) else str(v)[:40]
        raise ProtocolError(f"bad_{key}", f"{what} {key}={shown[:60]}: expected a finite number")
    return float(v)


def _window_id(v: object, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**62:
        raise ProtocolError("bad_window", f"{where}={str(v)[:40]}: expected a window id "
                            "(integer >= 0)")
    return v


def decode_label(payload: bytes, *, max_bytes: int) -> LabelMsg:
    """Decode a label message (see the module docstring)."""
    obj = _load(payload, "label", max_bytes)
    allowed = {"id", "label", "window", "windows", "from_ts", "to_ts", "values", "ts"}
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ProtocolError("unknown_field", f"label has unknown field(s) {unknown}")
    label = _text(obj, "label", "label", MAX_LABEL_CHARS, required=True)
    mid = _text(obj, "id", "label", MAX_ID_CHARS, required=False)
    if mid is None:
        mid = "sha1:" + hashlib.sha1(bytes(payload)).hexdigest()[:20]
    targets = [k for k in ("window", "windows", "from_ts", "values") if k in obj]
    if "to_ts" in obj and "from_ts" not in obj:
        raise ProtocolError("missing_field", "label has to_ts without from_ts")
    if len(targets) != 1:
        raise ProtocolError("bad_target", f"label must name exactly one of window, windows, "
                            f"from_ts/to_ts, values; got {targets or 'none'}")
    ts = _number(obj, "ts", "label")
    kind = targets[0]
    if kind == "window":
        return LabelMsg(mid, label, windows=(_window_id(obj["window"], "window"),), ts=ts)
    if kind == "windows":
        ws = obj["windows"]
        if not isinstance(ws, list) or not 1 <= len(ws) <= MAX_WINDOWS_PER_LABEL:
            raise ProtocolError("bad_window", f"windows must be a list of 1-"
                                f"{MAX_WINDOWS_PER_LABEL} window ids")
        ids = tuple(_window_id(w, f"windows[{i}]") for i, w in enumerate(ws))
        return LabelMsg(mid, label, windows=tuple(dict.fromkeys(ids)), ts=ts)
    if kind == "from_ts":
        lo, hi = _number(obj, "from_ts", "label"), _number(obj, "to_ts", "label")
        if lo is None:
            raise ProtocolError("bad_from_ts", "label from_ts=None: expected a finite number")
        if hi is None:
            raise ProtocolError("missing_field", "label has from_ts without to_ts")
        if not lo <= hi or hi - lo > MAX_LABEL_SPAN_S:
            raise ProtocolError("bad_range", f"label from_ts={lo} to_ts={hi}: expected "
                                f"from_ts <= to_ts and a span of at most {MAX_LABEL_SPAN_S:.0f} s")
        return LabelMsg(mid, label, from_ts=lo, to_ts=hi, ts=ts)
    return LabelMsg(mid, label, values=values_from_json(obj["values"], "label "), ts=ts)


def decode_command(payload: bytes, *, max_bytes: int = 4096) -> CommandMsg:
    """Decode a command message (see the module docstring)."""
    obj = _load(payload, "command", max_bytes)
    unknown = sorted(set(obj) - {"id", "cmd", "budget_s", "to_version", "ts", "sig", "nonce"})
    if unknown:
        raise ProtocolError("unknown_field", f"command has unknown field(s) {unknown}")
    cmd = obj.get("cmd")
    if cmd not in COMMANDS:
        raise ProtocolError("unknown_command", f"cmd={cmd!r}, expected one of {list(COMMANDS)}")
    mid = _text(obj, "id", "command", MAX_ID_CHARS, required=False) or ""
    budget = _number(obj, "budget_s", "command")
    if budget is not None and not 0 < budget <= 3600:
        raise ProtocolError("bad_budget_s", f"command budget_s={budget}: expected 0 < s <= 3600")
    to_version = obj.get("to_version")
    if to_version is not None and (isinstance(to_version, bool) or not isinstance(to_version, int)
                                   or to_version < 0):
        raise ProtocolError("bad_to_version", f"command to_version={to_version!r}: expected "
                            "an integer >= 0")
    ts = _number(obj, "ts", "command")
    sig = obj.get("sig")
    if sig is not None and (not isinstance(sig, str) or len(sig) != 64
                            or any(c not in "0123456789abcdef" for c in sig)):
        raise ProtocolError("bad_sig", "command sig: expected 64 lower-case hex digits "
                            "(HMAC-SHA256)")
    nonce = obj.get("nonce")
    if nonce is not None and (not isinstance(nonce, str) or not NONCE_RE.match(nonce)):
        raise ProtocolError("bad_nonce", f"command nonce={str(nonce)[:80]!r}: expected 16-64 "
                            "characters of [A-Za-z0-9_-]")
    return CommandMsg(mid, cmd, budget, to_version, ts, sig,
                      canonical_command(obj) if sig is not None else b"", nonce)


def encode_reply(*, id: str, cmd: str, ok: bool, ts: float, **result: object) -> bytes:
    body = {"v": 1, "id": id, "cmd": cmd, "ok": ok, "ts": ts, **result}
    return json.dumps(body, separators=(",", ":"), allow_nan=False, default=str).encode()
