"""Per-device access control at the broker: mutual TLS + mosquitto ``acl_file`` with ``%u``.

The ``acl`` listener of `secure_broker` (tests/tlsbroker.py, `tlsbroker.ACL`) takes the
client certificate's common name as the MQTT user. A gateway daemon (CN `AGENT_CN`) serves
every device; each device (CN = its id) may publish only its own frames and labels and read
only its own predictions and events; the operator (CN `OPERATOR_CN`) may command the gateway.

A publication the ACL denies is dropped by the broker: MQTT 5 says so in the QoS 1 PUBACK
(reason "Not authorized"), MQTT 3.1.1 cannot (a plain PUBACK) and QoS 0 has no
acknowledgement at all. So every denial is also proven at the receiving end: the daemon's
``reverie_messages_received_total`` did not move, and an auditor on the ACL-free ``mtls``
listener (same broker, same topic tree) saw no prediction for the victim. The proof is
ordered, not timed: the denied messages are sent before an allowed one on the same
connection, and the allowed one's prediction is awaited; the broker handles one client's
packets in order and forwards to the daemon's single connection in order.

mosquitto's acl_file does not check subscriptions: a SUBACK grants any filter, and the
``read`` rules filter each message at delivery. The tests pin that down (a subscription to
another device's predictions is granted yet never delivers).
"""

from __future__ import annotations

import json
import time

import pytest
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import AgentConfig, BrokerConfig, SleepSchedule
from agent.daemon import Daemon
from agent.errors import BrokerError
from agent.mqtt import BrokerURL, TLSConfig, connect_and_wait, make_client
from agent.protocol import encode_frame_binary
from agent.topics import Topics
from firmware_sim.signals import SignalGenerator
from tests.conftest import MqttProbe
from tests.tlsbroker import AGENT_CN, OPERATOR_CN

PROTOCOLS = ("5", "3.1.1")
FRAME = 32                      # samples per frame: 4 frames make one 128-sample window
GATEWAY = Topics("gateway")     # the agent's own topics (status owner "gateway")
NOT_AUTHORIZED = 0x87
FORGED = b'{"forged": true}'


class TlsProbe(MqttProbe):
    """An `MqttProbe` over (mutual) TLS that also records each PUBACK's reason code."""

    def __init__(self, url: str, tls: TLSConfig, *, protocol: str):
        # The parent builds a plain client; TLS is set here, with our CA and certificate.
        super().__init__(url.replace("mqtts://", "mqtt://", 1), protocol=protocol)
        self.url = BrokerURL.parse(url)
        self.client.tls_set_context(tls.context())
        self.pubacks: dict[int, ReasonCode] = {}
        self.client.on_publish = self._on_publish

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._cond:
            self.pubacks[mid] = reason_code

    def publish_acked(self, topic: str, payload: bytes | str) -> ReasonCode:
        """Publish at QoS 1, wait for the PUBACK and return its reason code."""
        info = self.publish(topic, payload, qos=1)
        with self._cond:
            return self.pubacks[info.mid]


@pytest.fixture
def acl_client(secure_broker):
    """Factory: a connected `TlsProbe` on the ACL listener with a certificate for `cn`."""
    probes: list[TlsProbe] = []

    def make(cn: str, *filters: str, protocol: str = "5") -> TlsProbe:
        probe = TlsProbe(secure_broker.url_acl, secure_broker.pki.tls(cn=cn), protocol=protocol)
        probes.append(probe)
        probe.connect()
        if filters:
            probe.subscribe(*filters)
        return probe

    yield make
    for probe in probes:
        probe.close()


@pytest.fixture
def auditor(secure_broker):
    """A probe on the ACL-free mutual-TLS listener: it sees every message on the broker."""
    probe = TlsProbe(secure_broker.url_mtls, secure_broker.pki.tls(client=True), protocol="5")
    yield probe.connect()
    probe.close()


@pytest.fixture(scope="module")
def gateway(secure_broker, sim_bundle, tmp_path_factory):
    """One gateway daemon for the module, on the ACL listener as `AGENT_CN`; tests use
    unique device ids. State-changing commands only on its own topic (commands.from)."""
    broker = BrokerConfig(url=BrokerURL.parse(secure_broker.url_acl), session_expiry_s=0,
                          tls=secure_broker.pki.tls(cn=AGENT_CN))
    d = Daemon(AgentConfig(bundle=sim_bundle, device_id="+", broker=broker,
                           state_dir=tmp_path_factory.mktemp("acl-gateway-state"),
                           commands_from="agent", sleep=SleepSchedule(idle_after_s=3600)))
    d.start()
    try:
        assert d.wait_connected(10), ("gateway not connected; broker log:\n"
                                      + secure_broker.log_tail())
        yield d
    finally:
        d.stop()


def _window(seed: int = 0) -> list[bytes]:
    """One window's worth of binary frames (4 x 32 samples, 6 channels)."""
    gen = SignalGenerator(seed)
    return [encode_frame_binary(i, 1000.0 + i, gen.samples("walk", FRAME)) for i in range(4)]


def _received(gateway) -> dict[str, float]:
    return {kind: gateway.metrics.messages_received.value(kind=kind)
            for kind in ("frames", "labels", "cmd")}


def _other_device(device: str) -> str:
    return device + "-victim"


def _wait_until(predicate, *, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not reach the daemon within {timeout_s} s")
        time.sleep(0.01)


# -- allowed ----------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_device_publishes_its_own_frames_and_reads_its_own_predictions(
        gateway, acl_client, unique_device, protocol):
    t = Topics(unique_device)
    device = acl_client(unique_device, t.predictions, t.events, protocol=protocol)
    for payload in _window():
        device.publish(t.frames, payload, qos=0)
    pred = device.wait_for_count(1, topic=t.predictions, timeout_s=10)[0].json()
    assert pred["device"] == unique_device and pred["window"] == 0
    assert not [m for m in device.messages if m.topic == t.events]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_operator_commands_the_gateway_and_reads_the_reply(gateway, acl_client, protocol):
    operator = acl_client(OPERATOR_CN, GATEWAY.replies, protocol=protocol)
    for body in ({"id": f"st-{protocol}", "cmd": "status"},
                 {"id": f"snap-{protocol}", "cmd": "snapshot"}):
        operator.clear()
        if protocol == "5":
            assert operator.publish_acked(GATEWAY.cmd, json.dumps(body)).value == 0
        else:
            operator.publish(GATEWAY.cmd, json.dumps(body), qos=1)
        reply = operator.wait_for_count(1, topic=GATEWAY.replies, timeout_s=10)[0].json()
        assert reply["id"] == body["id"] and reply["ok"] is True, reply


# -- denied -----------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("qos", [0, 1])
def test_a_device_cannot_publish_for_another_device_or_command_the_gateway(
        gateway, acl_client, auditor, unique_device, protocol, qos):
    mine, victim = Topics(unique_device), Topics(_other_device(unique_device))
    auditor.subscribe(f"{mine.prefix}/{victim.device}/#", GATEWAY.cmd, mine.cmd,
                      mine.predictions)
    device = acl_client(unique_device, protocol=protocol)
    snapshot = json.dumps({"id": "evil", "cmd": "snapshot"})
    denied = [(victim.frames, p) for p in _window(seed=1)] + [
        (GATEWAY.cmd, snapshot),                      # commands are the operator's
        (mine.cmd, snapshot),                         # even on its own cmd topic
        (victim.labels, json.dumps({"label": "walk", "window": 0})),
        (mine.predictions, FORGED),                   # predictions are the agent's
    ]
    before = _received(gateway)
    for topic, payload in denied:
        if qos == 0:
            device.publish(topic, payload, qos=0)
            continue
        reason = device.publish_acked(topic, payload)
        # MQTT 5 names the refusal; 3.1.1 has no way to, and acknowledges as usual.
        assert reason.value == (NOT_AUTHORIZED if protocol == "5" else 0), (topic, reason)
    # Barriers, after the denied messages on the same connection: an allowed window (the
    # daemon takes frames at QoS 0) and an allowed label (labels and commands at QoS 1,
    # which the broker may hold back behind unacknowledged ones, so it gets its own).
    for payload in _window():
        device.publish(mine.frames, payload, qos=qos)
    device.publish(mine.labels, json.dumps({"label": "walk", "window": 0}), qos=qos)
    auditor.wait_for_count(1, topic=mine.predictions, timeout_s=10)
    _wait_until(lambda: _received(gateway)["labels"] > before["labels"], what="the label")
    assert _received(gateway) == {"frames": before["frames"] + 4,
                                  "labels": before["labels"] + 1, "cmd": before["cmd"]}
    seen = [(m.topic, m.payload) for m in auditor.messages]
    assert {t for t, _ in seen} == {mine.predictions}, seen
    assert FORGED not in [p for _, p in seen]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_device_never_receives_another_devices_predictions(gateway, acl_client,
                                                             unique_device, protocol):
    mine, other = Topics(unique_device), Topics(_other_device(unique_device))
    # Granted: mosquitto's acl_file checks `read` per delivered message, not at SUBSCRIBE.
    nosy = acl_client(mine.device, mine.predictions, other.predictions,
                      f"{mine.prefix}/+/predictions", protocol=protocol)
    victim = acl_client(other.device, other.predictions, protocol=protocol)
    for payload in _window(seed=2):
        victim.publish(other.frames, payload, qos=1)
    victim.wait_for_count(1, topic=other.predictions, timeout_s=10)
    # The daemon published the victim's prediction first, so it would have arrived first.
    for payload in _window():
        nosy.publish(mine.frames, payload, qos=1)
    nosy.wait_for_count(1, topic=mine.predictions, timeout_s=10)
    assert {m.topic for m in nosy.messages} == {mine.predictions}


def test_a_certificate_from_another_ca_is_refused_whatever_its_name(secure_broker):
    """A rogue CA can put ``CN=reverie-agent`` in a certificate: the broker still refuses."""
    url = BrokerURL.parse(secure_broker.url_acl)
    client = make_client(url, tls=secure_broker.pki.tls(cn=AGENT_CN, rogue_client=True))
    since = secure_broker.log_size()
    try:
        with pytest.raises(BrokerError, match=secure_broker.url_acl):
            connect_and_wait(client, url, timeout_s=1.0)
    finally:
        client.loop_stop()
    secure_broker.wait_for_log("certificate verify failed", since=since)


def test_a_client_certificate_common_name_is_validated(secure_broker):
    from agent.errors import ConfigError

    with pytest.raises(ConfigError, match="'a/b'"):
        secure_broker.pki.issue_client_cert("a/b")
