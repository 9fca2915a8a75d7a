"""Issue 13, findings 5 and 6: signed commands run at most once, wherever and whenever a
copy is replayed, and replies go only to the agent's own replies topic.

A real gateway daemon with ``commands.key_file`` on the session's mosquitto. A captured
signed ``snapshot``: its copy on another device's cmd topic does not verify (the HMAC
covers the topic and the agent id); a copy after 300 unsigned ``status`` commands flushed
the reply cache, and a copy after a restart, are refused (the nonce store is persistent);
an unauthorized command cannot squat the id the operator uses next. The MQTT 5
ResponseTopic of a request is ignored unless it is the agent's own replies topic.
"""

from __future__ import annotations

import json

import pytest

from agent.daemon import Daemon
from agent.messages import sign_command
from agent.persist.nonces import NonceStore
from agent.topics import Topics
from tests.agent.test_daemon import agent_config

KEY = b"k" * 32


@pytest.fixture
def signed_gateway(base_bundle, broker_url, broker, tmp_path, unique_device):
    (tmp_path / "cmd.key").write_bytes(KEY)
    prefix = f"hc/{unique_device}"
    made = []

    def make():
        d = Daemon(agent_config(base_bundle, broker_url, "+", broker.protocols[-1],
                                prefix=prefix, state_dir=tmp_path / "state",
                                commands_key_file=tmp_path / "cmd.key",
                                client_id=f"agent-{unique_device}"))
        made.append(d)
        d.start()
        assert d.wait_connected(10)
        return d

    yield prefix, make
    for d in made:
        d.stop()


def _ask(probe, t: Topics, payload: bytes | str, **kw) -> dict:
    n = len([m for m in probe.messages if m.topic == t.replies])
    probe.publish(t.cmd, payload, qos=1, **kw)
    return probe.wait_for_count(n + 1, topic=t.replies, timeout_s=10)[n].json()


def test_a_signed_command_runs_once_across_topics_cache_flushes_and_restarts(
        signed_gateway, mqtt_collector):
    prefix, make = signed_gateway
    d = make()
    gw, dev = Topics("gateway", prefix), Topics("dev1", prefix)
    probe = mqtt_collector(gw.replies, dev.replies)
    snapshot = json.dumps(sign_command({"id": "s1", "cmd": "snapshot"}, KEY, topic=gw.cmd,
                                       agent="gateway"))
    first = _ask(probe, gw, snapshot)
    assert first["ok"] and first["checkpoints"]["gateway"] >= 1, first
    # a redelivery (same bytes, same topic, cache still holds it): answered, not re-run
    again = _ask(probe, gw, snapshot)
    assert again["ok"] and again["duplicate"] and again["checkpoints"] == first["checkpoints"]
    # the same bytes on another device's cmd topic: the signature covers the topic
    other = _ask(probe, dev, snapshot)
    assert not other["ok"] and other["reason"] == "not_authorized"
    assert "bad signature" in other["error"], other
    # flush the reply cache with unsigned status commands, then replay
    for i in range(300):
        probe.publish(gw.cmd, json.dumps({"id": f"st{i}", "cmd": "status"}), qos=1, wait=False)
    probe.wait_for_count(302, topic=gw.replies, timeout_s=60)
    replay = _ask(probe, gw, snapshot)
    assert not replay["ok"] and replay["reason"] == "not_authorized", replay
    assert "was used before" in replay["error"]
    d.stop()
    # after a restart (the nonce store is in the state directory)
    d2 = make()
    after = _ask(probe, gw, snapshot)
    assert not after["ok"] and "was used before" in after["error"], after
    # a fresh signature still works
    fresh = _ask(probe, gw, json.dumps(sign_command({"id": "s2", "cmd": "snapshot"}, KEY,
                                                    topic=gw.cmd, agent="gateway")))
    assert fresh["ok"] and fresh["checkpoints"]["gateway"] > first["checkpoints"]["gateway"]
    assert d2.metrics.dropped.labels(reason="not_authorized").value() == 1


def test_another_agents_signature_and_an_unsigned_squatter_are_refused(
        signed_gateway, mqtt_collector):
    prefix, make = signed_gateway
    make()
    gw = Topics("gateway", prefix)
    probe = mqtt_collector(gw.replies)
    # signed for another agent on the same topic layout
    r = _ask(probe, gw, json.dumps(sign_command({"id": "o1", "cmd": "snapshot"}, KEY,
                                                topic=gw.cmd, agent="gateway-2")))
    assert not r["ok"] and "bad signature" in r["error"]
    # an unsigned command squats id "op7" ...
    r = _ask(probe, gw, json.dumps({"id": "op7", "cmd": "snapshot"}))
    assert not r["ok"] and "must be signed" in r["error"]
    # ... and the operator's signed command with that id still runs (not answered from a cache)
    r = _ask(probe, gw, json.dumps(sign_command({"id": "op7", "cmd": "snapshot"}, KEY,
                                                topic=gw.cmd, agent="gateway")))
    assert r["ok"] and "duplicate" not in r and r["checkpoints"]["gateway"] >= 1, r


def test_replies_never_go_to_a_response_topic_other_than_our_own(
        base_bundle, broker_url, broker, mqtt_collector, unique_device):
    if "5" not in broker.protocols:
        pytest.skip("response topics are MQTT 5")
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    d = Daemon(agent_config(base_bundle, broker_url, unique_device, "5"))
    d.start()
    try:
        assert d.wait_connected(10)
        t, victim = Topics(unique_device), Topics(f"{unique_device}-victim")
        probe = mqtt_collector(t.replies, victim.predictions, protocol="5")
        abuse = Properties(PacketTypes.PUBLISH)
        abuse.ResponseTopic = victim.predictions
        abuse.CorrelationData = b"x"
        probe.client.publish(t.cmd, json.dumps({"id": "r1", "cmd": "status"}), qos=1,
                             properties=abuse).wait_for_publish(10)
        own = Properties(PacketTypes.PUBLISH)
        own.ResponseTopic = t.replies
        own.CorrelationData = b"corr-2"
        probe.client.publish(t.cmd, json.dumps({"id": "r2", "cmd": "status"}), qos=1,
                             properties=own).wait_for_publish(10)
        replies = probe.wait_for_count(2, topic=t.replies, timeout_s=10)
        assert [r.json()["id"] for r in replies] == ["r1", "r2"]
        assert replies[1].properties.CorrelationData == b"corr-2"
        assert not getattr(replies[0].properties, "CorrelationData", None)
        # both replies came in after the abusive request: nothing reached the victim
        assert not [m for m in probe.messages if m.topic == victim.predictions]
    finally:
        d.stop()


def test_the_nonce_store_survives_restarts_and_forgets_expired_nonces(tmp_path, monkeypatch):
    import time

    path = tmp_path / "nonces"
    now = time.time()
    store = NonceStore(path, max_entries=3)
    assert store.claim("a" * 16, expires=now + 100)
    assert not store.claim("a" * 16, expires=now + 100)
    assert store.claim("b" * 16, expires=now + 1)
    assert "a" * 16 in NonceStore(path)
    monkeypatch.setattr(time, "time", lambda: now + 50)
    reopened = NonceStore(path, max_entries=3)
    assert "a" * 16 in reopened and "b" * 16 not in reopened
    assert reopened.claim("b" * 16, expires=now + 200)
    reopened.claim("c" * 16, expires=now + 200)
    with pytest.raises(Exception, match="refusing more"):
        reopened.claim("d" * 16, expires=now + 200)
    # a torn last line (a crash mid-append) is ignored
    with open(path, "ab") as f:
        f.write(b"17")
    assert len(NonceStore(path)) == 3
