import pytest

from agent.errors import ConfigError
from agent.mqtt import BrokerURL
from agent.topics import Topics, validate_device_id


def test_topics_for_one_device():
    t = Topics("dev-1")
    assert t.frames == "reverie/v1/dev-1/frames"
    assert t.status == "reverie/v1/dev-1/status"
    assert Topics("d", prefix="site/a").events == "site/a/d/events"


def test_wildcard_parses_any_device_but_not_foreign_topics():
    t = Topics("+")
    assert t.frames == "reverie/v1/+/frames"
    assert t.parse("reverie/v1/x9/frames") == ("x9", "frames")
    with pytest.raises(ValueError, match="Invalid topic"):
        t.parse("other/v1/x9/frames")
    with pytest.raises(ValueError, match="Invalid topic"):
        t.parse("reverie/v1/x9/frames/extra")
    with pytest.raises(ValueError, match="expected device"):
        Topics("a").parse("reverie/v1/b/frames")


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "x" * 65, "sp ace"])
def test_bad_device_ids_are_refused(bad):
    with pytest.raises(ValueError, match="Invalid device id"):
        Topics(bad)


def test_bad_prefix_is_refused():
    with pytest.raises(ValueError, match="Invalid topic prefix"):
        Topics("d", prefix="a/#")


def test_broker_urls():
    assert BrokerURL.parse("mqtt://h:1") == BrokerURL("h", 1)
    u = BrokerURL.parse("mqtts://us%40r:pw@example.org")
    assert (u.port, u.tls, u.username, u.password) == (8883, True, "us@r", "pw")
    for bad in ["localhost:1883", "http://h", "mqtt://:1883", "mqtt://h:99999", "mqtt://h/x"]:
        with pytest.raises(ConfigError, match="Invalid broker URL"):
            BrokerURL.parse(bad)


@pytest.mark.parametrize("bad", [".", ".."])
def test_dot_device_ids_are_refused(bad):
    """'.' and '..' would name the state directory itself or its parent (per-device state)."""
    with pytest.raises(ValueError, match="Invalid device id"):
        validate_device_id(bad)
