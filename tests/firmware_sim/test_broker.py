"""EmbeddedBroker: the session broker carries traffic; standalone brokers start, restart, stop."""

import socket
import threading

import pytest

from agent.errors import BrokerError, ConfigError
from firmware_sim import broker as broker_module
from firmware_sim.broker import (
    EmbeddedBroker,
    accepts,
    amqtt_available,
    find_mosquitto,
    resolve_kind,
)
from tests.conftest import MqttProbe

N_BURST = 5_000
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="no mosquitto binary")
needs_amqtt = pytest.mark.skipif(not amqtt_available(), reason="amqtt not installed")


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_round_trip(broker, mqtt_collector, unique_device, protocol, qos):
    if protocol not in broker.protocols:
        pytest.skip(f"{broker.kind} does not speak MQTT {protocol}")
    topic = f"test/{unique_device}/round-trip"
    sub = mqtt_collector(topic, protocol=protocol, qos=qos)
    pub = mqtt_collector(protocol=protocol)
    pub.publish(topic, b"hello", qos=qos)
    [msg] = sub.wait_for_count(1, topic=topic)
    assert (msg.payload, msg.qos, msg.retain) == (b"hello", qos, False)


def test_burst_to_a_slow_subscriber_is_all_delivered(broker, mqtt_collector, unique_device):
    # The paused subscriber acknowledges nothing, so all but max_inflight messages wait in
    # the broker's queue; mosquitto's default max_queued_messages (1000) would drop most.
    topic = f"test/{unique_device}/burst"
    sub = mqtt_collector(topic, qos=1)
    sub.pause()
    pub = mqtt_collector()
    infos = [pub.publish(topic, str(i), qos=1, wait=False) for i in range(N_BURST)]
    for info in infos:
        info.wait_for_publish(30)
    assert all(info.is_published() for info in infos)
    sub.resume()
    got = sub.wait_for_count(N_BURST, topic=topic, timeout_s=30)
    assert sorted(int(m.payload) for m in got) == list(range(N_BURST))


def test_the_session_broker_reports_itself(broker, broker_url):
    assert broker.running and broker.url == broker_url == f"mqtt://127.0.0.1:{broker.port}"
    assert broker.kind in ("mosquitto", "amqtt")
    assert "3.1.1" in broker.protocols


@needs_amqtt
def test_amqtt_standalone_round_trip_and_clean_stop(unique_device):
    topic = f"test/{unique_device}/amqtt"
    with EmbeddedBroker(prefer="amqtt") as b:
        assert (b.kind, b.protocols) == ("amqtt", ("3.1.1",))
        port = b.port
        with MqttProbe(b.url, protocol="3.1.1").connect() as sub, \
                MqttProbe(b.url, protocol="3.1.1").connect() as pub:
            sub.subscribe(topic, qos=1)
            pub.publish(topic, b"over amqtt", qos=1)
            [msg] = sub.wait_for_count(1, topic=topic)
            assert msg.payload == b"over amqtt"
    assert not b.running
    assert f"amqtt-broker-{port}" not in {t.name for t in threading.enumerate()}
    assert not accepts(port)


@needs_mosquitto
def test_mosquitto_restart_keeps_the_port_and_persisted_state(tmp_path, unique_device):
    topic = f"test/{unique_device}/retained"
    with EmbeddedBroker(prefer="mosquitto", workdir=tmp_path, persistence=True) as b:
        port = b.port
        with MqttProbe(b.url).connect() as pub:
            pub.publish(topic, b"kept", qos=1, retain=True)
        b.restart()
        assert b.port == port and b.running
        with MqttProbe(b.url).connect() as sub:
            sub.subscribe(topic, qos=1)
            [msg] = sub.wait_for_count(1, topic=topic)
            assert (msg.payload, msg.retain) == (b"kept", True)
    assert not accepts(port)
    assert (tmp_path / "mosquitto.db").exists(), "a caller's workdir is kept"


@needs_mosquitto
def test_mosquitto_private_workdir_is_removed_at_stop():
    with EmbeddedBroker(prefer="mosquitto") as b:
        workdir = b.log_path.parent
        assert (workdir / "mosquitto.conf").exists()
    assert not workdir.exists()


def test_prefer_mosquitto_without_a_binary_raises(monkeypatch):
    monkeypatch.setattr(broker_module, "find_mosquitto", lambda: None)
    b = EmbeddedBroker(prefer="mosquitto")
    with pytest.raises(BrokerError, match="No mosquitto binary found"):
        b.start()
    assert not b.running


@needs_amqtt
def test_auto_without_a_binary_falls_back_to_amqtt(monkeypatch):
    monkeypatch.setattr(broker_module, "find_mosquitto", lambda: None)
    assert resolve_kind("auto") == "amqtt"


@pytest.mark.parametrize("prefer", [
    pytest.param("mosquitto", marks=needs_mosquitto),
    pytest.param("amqtt", marks=needs_amqtt),
])
def test_a_fixed_port_in_use_raises_with_the_reason(prefer):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerError, match="in use"):
            EmbeddedBroker(prefer=prefer, port=port).start()


@pytest.mark.parametrize("kwargs", [{"prefer": "rabbitmq"}, {"port": 0}, {"port": 70000}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ConfigError, match="Invalid broker"):
        EmbeddedBroker(**kwargs)


@needs_amqtt
def test_persistence_needs_mosquitto():
    with pytest.raises(BrokerError, match="persistence"):
        EmbeddedBroker(prefer="amqtt", persistence=True).start()
