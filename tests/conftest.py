"""Shared fixtures: one real MQTT broker per session, unique device ids, an MQTT probe.

Choose the broker with ``REVERIE_TEST_BROKER=auto|mosquitto|amqtt`` (default auto:
mosquitto when a binary exists, else the in-process amqtt broker, MQTT 3.1.1 only).
"""

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
# Before numba / hnswlib are imported anywhere: a writable kernel cache, portable builds.
os.environ.setdefault("NUMBA_CACHE_DIR", str(_REPO / ".cache" / "numba"))
os.environ.setdefault("HNSWLIB_NO_NATIVE", "1")

import json  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from agent.errors import ReverieError  # noqa: E402
from agent.mqtt import BrokerURL, make_client  # noqa: E402
from firmware_sim.broker import EmbeddedBroker, find_mosquitto, resolve_kind  # noqa: E402

BROKER_ENV = "REVERIE_TEST_BROKER"
# HYPOTHESIS_PROFILE=ci (set by .ci/run): derandomized, so CI is reproducible; the default
# profile explores new examples on every local run.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
pytest_plugins = ["tests.tlsbroker"]   # the `secure_broker` fixture (TLS, mTLS, passwords)


def _broker_preference() -> str:
    return os.environ.get(BROKER_ENV, "auto").strip().lower() or "auto"


def pytest_report_header(config):
    prefer = _broker_preference()
    try:
        kind = resolve_kind(prefer)
    except ReverieError as exc:
        return f"mqtt broker: unavailable ({BROKER_ENV}={prefer}): {exc}"
    if kind == "mosquitto":
        return f"mqtt broker: mosquitto ({find_mosquitto()}), MQTT 3.1.1 + 5 ({BROKER_ENV}={prefer})"
    if prefer == "auto":
        return "mqtt broker: no mosquitto binary found: using in-process amqtt (MQTT 3.1.1 only)"
    return f"mqtt broker: in-process amqtt (MQTT 3.1.1 only) ({BROKER_ENV}={prefer})"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # Before -m deselection runs, so `-m "not broker"` skips every test that needs one.
    broker_fixtures = {"broker", "broker_url", "mqtt_collector", "secure_broker"}
    for item in items:
        if broker_fixtures & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


@pytest.fixture(scope="session")
def broker():
    """The session's EmbeddedBroker (started once; shared, so use unique topics)."""
    with EmbeddedBroker(prefer=_broker_preference()) as b:
        yield b


@pytest.fixture(scope="session")
def broker_url(broker) -> str:
    return broker.url


@pytest.fixture
def unique_device() -> str:
    """A device id no other test uses, e.g. ``t-3f9c0a1b2d``."""
    return "t-" + uuid.uuid4().hex[:10]


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: object = None  # paho Properties for MQTT 5, else None

    def json(self):
        return json.loads(self.payload)


class MqttProbe:
    """A paho client for tests: connects, subscribes, collects messages thread-safely.

    connect() waits for CONNACK and subscribe() for SUBACK, so a probe that returned is
    ready to receive. pause() makes the probe a slow consumer: its network thread blocks
    on the next message (no PUBACK, no reads) until resume().

    >>> probe = MqttProbe(broker_url).connect().subscribe("a/#")   # doctest: +SKIP
    >>> probe.publish("a/1", b"x", qos=1)                          # doctest: +SKIP
    >>> probe.wait_for(lambda msgs: len(msgs) >= 1)                 # doctest: +SKIP
    """

    def __init__(self, url: str, *, protocol: str = "5", client_id: str | None = None,
                 timeout_s: float = 10.0, clean_start: bool = True):
        self.url = BrokerURL.parse(url)
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.client = make_client(self.url, client_id=client_id, protocol=protocol,
                                  clean_start=clean_start)
        self._clean_start = clean_start
        self._cond = threading.Condition()
        self._messages: list[Received] = []
        self._connack = None
        self._subacks: dict[int, list] = {}
        self._flowing = threading.Event()
        self._flowing.set()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._started = False

    # -- paho callbacks (network thread) ----------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            self._connack = reason_code
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cond:
            self._subacks[mid] = list(reason_codes)
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg):
        self._flowing.wait()
        received = Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain),
                            getattr(msg, "properties", None))
        with self._cond:
            self._messages.append(received)
            self._cond.notify_all()

    # -- test-side API ----------------------------------------------------------------
    def connect(self) -> "MqttProbe":
        kwargs = {"clean_start": self._clean_start} if self.protocol == "5" else {}
        self.client.connect(self.url.host, self.url.port, keepalive=30, **kwargs)
        self.client.loop_start()
        self._started = True
        with self._cond:
            if not self._cond.wait_for(lambda: self._connack is not None, self.timeout_s):
                raise TimeoutError(f"no CONNACK from {self.url} within {self.timeout_s} s")
            if self._connack.is_failure:
                raise ConnectionError(f"{self.url} refused the connection: {self._connack}")
        return self

    def subscribe(self, *topic_filters: str, qos: int = 1) -> "MqttProbe":
        for topic_filter in topic_filters:
            rc, mid = self.client.subscribe(topic_filter, qos=qos)
            if rc != 0:
                raise ConnectionError(f"subscribe({topic_filter!r}) failed: rc={rc}")
            with self._cond:
                if not self._cond.wait_for(lambda m=mid: m in self._subacks, self.timeout_s):
                    raise TimeoutError(f"no SUBACK for {topic_filter!r} within {self.timeout_s} s")
                codes = self._subacks.pop(mid)
            if any(code.is_failure for code in codes):
                raise ConnectionError(f"broker refused subscription {topic_filter!r}: {codes}")
        return self

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, *, retain: bool = False,
                wait: bool = True):
        """Publish; with `wait`, return only after the broker acknowledged it (QoS > 0)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if wait:
            info.wait_for_publish(self.timeout_s)
            if not info.is_published():
                raise TimeoutError(f"publish to {topic!r} not acknowledged within {self.timeout_s} s")
        return info

    @property
    def messages(self) -> list[Received]:
        """A snapshot of everything received so far."""
        with self._cond:
            return list(self._messages)

    def wait_for(self, predicate: Callable[[list[Received]], bool],
                 timeout_s: float = 5.0) -> list[Received]:
        """Block until `predicate(messages)` holds; return the messages at that moment."""
        with self._cond:
            if self._cond.wait_for(lambda: predicate(self._messages), timeout_s):
                return list(self._messages)
            got = [(m.topic, m.payload[:60]) for m in self._messages[-5:]]
        raise TimeoutError(f"condition not met within {timeout_s} s; "
                           f"{len(self._messages)} messages, last: {got}")

    def wait_for_count(self, n: int, topic: str | None = None, timeout_s: float = 5.0) -> list[Received]:
        """Block until `n` messages (on `topic`, if given) arrived; return those."""
        # Incremental: the predicate runs on every arrival, a full rescan would be O(n^2).
        scanned, matched = 0, []

        def enough(msgs):
            nonlocal scanned
            matched.extend(m for m in msgs[scanned:] if topic is None or m.topic == topic)
            scanned = len(msgs)
            return len(matched) >= n

        self.wait_for(enough, timeout_s)
        return matched

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._flowing.set()  # a paused network thread would never see the disconnect
        if self._started:
            self._started = False
            self.client.disconnect()
            self.client.loop_stop()

    def __enter__(self) -> "MqttProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture
def mqtt_collector(broker):
    """Factory of connected, subscribed MqttProbes, closed at teardown.

    ``mqtt_collector("reverie/v1/dev/#", protocol="3.1.1", qos=1, url=None)``: `url`
    defaults to the session broker; with no filters the probe only publishes.
    """
    probes: list[MqttProbe] = []

    def make(*topic_filters: str, protocol: str | None = None, qos: int = 1,
             url: str | None = None, client_id: str | None = None,
             clean_start: bool = True) -> MqttProbe:
        if protocol is None:
            protocol = "5" if "5" in broker.protocols else "3.1.1"
        probe = MqttProbe(url or broker.url, protocol=protocol, client_id=client_id,
                          clean_start=clean_start)
        probes.append(probe)
        probe.connect()
        if topic_filters:
            probe.subscribe(*topic_filters, qos=qos)
        return probe

    yield make
    for probe in probes:
        probe.close()



@pytest.fixture(scope="session")
def sim_bundle(tmp_path_factory) -> Path:
    """A small cnn1d bundle trained on the simulator's 6-channel data (shared, read-only)."""
    from export import train_bundle
    from firmware_sim.signals import write_dataset

    root = tmp_path_factory.mktemp("sim-bundle")
    data = write_dataset(root / "train.npz", n_per_class=60, seed=0)
    return train_bundle(data, root / "bundle", epochs=12, seed=0, name="test-sim", verbose=False)


@pytest.fixture(autouse=True)
def _restore_logging():
    """`reverie run` called in-process installs a handler on the (captured) stderr; restore
    the root logger so later tests do not log into a closed stream."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session", autouse=True)
def _numba_kernels_compiled():
    """Compile every numba kernel into NUMBA_CACHE_DIR once, up front: subprocesses that
    tests start (the daemon, SIGKILL children) then load them from the cache instead of
    spending their first seconds compiling (on a fresh clone the cache is empty)."""
    import importlib

    from agent.warmup import KERNEL_MODULES

    for name in KERNEL_MODULES:
        importlib.import_module(name).warmup()
