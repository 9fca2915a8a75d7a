"""The outbox: messages published while offline wait (bounded, oldest dropped first) and
go out in order once the connection is back; retained ones keep only the newest."""

import pytest

from agent.mqtt import BrokerURL, connect_and_wait, make_client
from agent.outbox import Outbox


@pytest.fixture
def client(broker):
    c = make_client(BrokerURL.parse(broker.url), protocol=broker.protocols[-1])
    yield c
    c.disconnect()
    c.loop_stop()


def test_offline_messages_wait_and_flush_in_order(client, broker, mqtt_collector, unique_device):
    drops = []
    box = Outbox(client, max_messages=5, on_drop=drops.append)
    topic = f"test/{unique_device}/out"
    probe = mqtt_collector(topic + "/#")
    for i in range(8):                                  # offline: buffered, bound 5
        box.publish(f"{topic}/m", str(i).encode())
    box.publish(f"{topic}/status", b"old", retain=True)
    box.publish(f"{topic}/status", b"new", retain=True)
    assert len(box) == 6 and box.dropped == 3 and sum(drops) == 3
    connect_and_wait(client, BrokerURL.parse(broker.url))
    box.set_online()
    assert box.flush() == 6 and len(box) == 0
    got = probe.wait_for_count(6, timeout_s=5)
    assert [m.payload for m in got if m.topic.endswith("/m")] == [b"3", b"4", b"5", b"6", b"7"]
    assert [m.payload for m in got if m.topic.endswith("/status")] == [b"new"]
    box.publish(f"{topic}/m", b"live")                 # online, nothing waiting: direct
    probe.wait_for(lambda ms: any(m.payload == b"live" for m in ms), timeout_s=5)
    assert box.sent == 7


def test_flush_does_nothing_while_offline(client):
    box = Outbox(client, max_messages=2)
    box.publish("t/x", b"1")
    assert box.flush() == 0 and len(box) == 1


def test_bound_must_be_positive(client):
    with pytest.raises(ValueError, match="max_messages=0"):
        Outbox(client, max_messages=0)
