"""Security limits at the daemon level: payload sizes and signed bundles.

The decoders' own checks are in test_protocol.py / test_messages.py and the signature's in
test_bundle.py / test_signing.py; these tests hold the daemon to them end to end: an
oversized frame, label or command over a real broker gets an ``oversized`` error event (and
a refused reply for a command) while the daemon keeps serving, and a bundle whose signature
does not verify with the configured key never gets as far as a broker connection.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.bundle import load_bundle, write_manifest
from agent.config import AgentConfig, IngestConfig
from agent.daemon import Daemon
from agent.errors import BundleError, ProtocolError
from agent.messages import decode_label
from agent.protocol import decode_frame, encode_frame_binary, encode_frame_json
from agent.topics import Topics
from firmware_sim.signals import SignalGenerator
from tests.agent.test_bundle import _key, _key_id, _sign, _write_public
from tests.agent.test_daemon import agent_config

MAX_PAYLOAD = 1024          # ingest.max_payload_bytes for these tests
MAX_COMMAND = 4096          # agent.messages.decode_command's fixed limit
FRAME_JSON = b'{"seq": 0, "ts": 1.0, "values": [[1, 2, 3, 4, 5, 6]]}'
LABEL_JSON = b'{"label": "walk", "window": 0}'


# -- the boundary, on the decoders ------------------------------------------------------
@given(size=st.integers(len(FRAME_JSON), 3 * MAX_PAYLOAD), limit=st.integers(1, 2 * MAX_PAYLOAD))
def test_a_payload_is_oversized_exactly_when_longer_than_the_limit(size, limit):
    """Padding with JSON whitespace keeps a message valid: only its length decides."""
    for decode, message in ((decode_frame, FRAME_JSON), (decode_label, LABEL_JSON)):
        payload = message + b" " * (size - len(message))
        if size > limit:
            with pytest.raises(ProtocolError) as info:
                decode(payload, max_bytes=limit)
            assert info.value.reason == "oversized"
            assert f"{size} bytes" in str(info.value) and f"max_bytes={limit}" in str(info.value)
        else:
            decode(payload, max_bytes=limit)


# -- the daemon over a real broker ------------------------------------------------------
@pytest.fixture
def small_daemon(sim_bundle, broker_url, broker, unique_device):
    d = Daemon(agent_config(sim_bundle, broker_url, unique_device, broker.protocols[-1],
                            ingest=IngestConfig(max_payload_bytes=MAX_PAYLOAD)))
    d.start()
    assert d.wait_connected(10)
    yield d
    d.stop()


def test_oversized_frames_labels_and_commands_get_error_events(small_daemon, mqtt_collector,
                                                              unique_device):
    t = Topics(unique_device)
    probe = mqtt_collector(t.predictions, t.events, t.replies)
    gen = SignalGenerator(0)
    big_binary = encode_frame_binary(0, 1.0, gen.samples("walk", 64))       # 24 + 64*6*4 bytes
    big_json = encode_frame_json(0, 1.0, gen.samples("walk", 32))
    big_label = LABEL_JSON + b" " * MAX_PAYLOAD
    big_command = json.dumps({"id": "x" * 10, "cmd": "status"}).encode() + b" " * MAX_COMMAND
    sent = [(t.frames, big_binary), (t.frames, big_json), (t.labels, big_label),
            (t.cmd, big_command)]
    assert all(len(payload) > MAX_PAYLOAD for _, payload in sent)
    for topic, payload in sent:
        probe.publish(topic, payload, qos=1)
    # Refused frames are reported once per device and reason, then rate-limited (issue 17:
    # a device whose frames are all refused must not flood its events): the two oversized
    # frames give one event, the label and the command one each; the counter counts all.
    events = [m.json() for m in probe.wait_for_count(3, topic=t.events, timeout_s=10)]
    assert sorted(e["topic"] for e in events) == sorted([t.frames, t.labels, t.cmd])
    for event in events:
        assert event["type"] == "error" and event["reason"] == "oversized", event
        limit = MAX_COMMAND if event["topic"] == t.cmd else MAX_PAYLOAD
        assert f"max_bytes={limit}" in event["detail"], event
    reply = probe.wait_for_count(1, topic=t.replies, timeout_s=10)[0].json()
    assert reply["ok"] is False and reply["reason"] == "oversized"
    assert small_daemon.metrics.dropped.value(reason="oversized") == len(sent)
    # Frames within the limit still make a prediction.
    for seq in range(4):
        frame = encode_frame_binary(seq, 2.0 + seq, gen.samples("walk", 32))
        assert len(frame) <= MAX_PAYLOAD
        probe.publish(t.frames, frame, qos=0)
    probe.wait_for_count(1, topic=t.predictions, timeout_s=10)


# -- signed bundles ---------------------------------------------------------------------
def _replace_model(bundle: Path) -> None:
    """What an attacker who cannot sign does: swap the model, fix up the manifest's hashes."""
    (bundle / "model.onnx").write_bytes(b"evil model")
    write_manifest(bundle, json.loads((bundle / "manifest.json").read_text()))


def _sign_with_another_key(bundle: Path) -> None:
    """What an attacker with their own key does: re-sign the modified bundle."""
    _replace_model(bundle)
    _sign(bundle, _key(666))


@pytest.mark.parametrize("tamper, message", [
    (_replace_model, "signature does not verify"),
    (_sign_with_another_key, f"signed by unknown key {_key_id(_key(666))}"),
])
def test_the_daemon_refuses_a_bundle_whose_signature_does_not_verify(
        sim_bundle, tmp_path, tamper, message):
    bundle = Path(shutil.copytree(sim_bundle, tmp_path / "bundle"))
    _sign(bundle, _key(1))
    public = _write_public(_key(1), tmp_path / "trusted.pub")
    assert load_bundle(bundle, public_keys=[public]).signed_by == _key_id(_key(1))
    tamper(bundle)
    with pytest.raises(BundleError, match=message):
        Daemon(AgentConfig(bundle=bundle, device_id="d", public_keys=[public]))

