"""TLS, mutual TLS and username/password against a real mosquitto (tests/tlsbroker.py).

Every connection goes through agent.mqtt (`make_client` + `connect_and_wait`), for MQTT 5
and 3.1.1. Refusals at the TLS layer are confirmed in the broker's log, so a refused
connection cannot pass for a merely slow one.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import BrokerError, ConfigError
from agent.mqtt import BrokerURL, TLSConfig, connect_and_wait, make_client
from tests.tlsbroker import (
    CLIENT_CN,
    PASSWORD,
    USERNAME,
    SecureMosquitto,
    credentials_url,
    make_pki,
)

# `secure_broker` is a session fixture from tests/tlsbroker.py (a pytest plugin, see conftest).
PROTOCOLS = ("5", "3.1.1")
# A refused client certificate closes the connection before CONNACK; keep the wait short.
REFUSED_TIMEOUT_S = 1.0


@pytest.fixture
def clients():
    """Factory: a paho client for `url` via agent.mqtt; every one is stopped at teardown."""
    made = []

    def make(url: str, protocol: str, tls: TLSConfig | None = None,
             client_id: str | None = None):
        client = make_client(BrokerURL.parse(url), protocol=protocol, tls=tls,
                             client_id=client_id)
        made.append(client)
        return client

    yield make
    for client in made:
        client.disconnect()
        client.loop_stop()


def _connect(make, url: str, protocol: str, tls: TLSConfig | None = None,
             timeout_s: float = 10.0, client_id: str | None = None):
    client = make(url, protocol, tls, client_id)
    connect_and_wait(client, BrokerURL.parse(url), timeout_s=timeout_s)
    return client


def _round_trip(client, topic: str) -> None:
    """Subscribe to `topic`, publish to it at QoS 1 and receive the message back."""
    subscribed, received = threading.Event(), []
    arrived = threading.Event()
    client.on_subscribe = lambda *args: subscribed.set()

    def on_message(c, userdata, msg):
        received.append((msg.topic, bytes(msg.payload)))
        arrived.set()

    client.on_message = on_message
    client.subscribe(topic, qos=1)
    assert subscribed.wait(10), f"no SUBACK for {topic!r}"
    client.publish(topic, b"over tls", qos=1).wait_for_publish(10)
    assert arrived.wait(10), f"nothing came back on {topic!r}"
    assert received == [(topic, b"over tls")]


# -- TLS, server certificate only -----------------------------------------------------
@pytest.mark.broker
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tls_with_the_right_ca_carries_traffic(secure_broker, clients, unique_device,
                                               protocol):
    client = _connect(clients, secure_broker.url_tls, protocol, secure_broker.pki.tls())
    _round_trip(client, f"test/{unique_device}/tls")


@pytest.mark.broker
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tls_with_the_wrong_ca_is_refused_naming_the_broker(secure_broker, clients, protocol):
    since = secure_broker.log_size()
    with pytest.raises(BrokerError) as excinfo:
        _connect(clients, secure_broker.url_tls, protocol, secure_broker.pki.tls(rogue_ca=True))
    message = str(excinfo.value)
    assert secure_broker.url_tls in message and "certificate verify failed" in message
    secure_broker.wait_for_log("alert unknown ca", since=since)


# -- mutual TLS -----------------------------------------------------------------------
@pytest.mark.broker
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_mutual_tls_with_the_client_certificate_carries_traffic(secure_broker, clients,
                                                                unique_device, protocol):
    since = secure_broker.log_size()
    client = _connect(clients, secure_broker.url_mtls, protocol,
                      secure_broker.pki.tls(client=True), client_id=unique_device)
    _round_trip(client, f"test/{unique_device}/mtls")
    # use_identity_as_username: the certificate's common name is the MQTT user.
    connected = f"as {unique_device} ("
    log = secure_broker.wait_for_log(connected, since=since)
    assert f"u'{CLIENT_CN}'" in log.split(connected, 1)[1].splitlines()[0]


@pytest.mark.broker
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case, broker_says", [
    ("no client certificate", "peer did not return a certificate"),
    ("rogue client certificate", "certificate verify failed"),
])
def test_mutual_tls_refuses_a_missing_or_untrusted_client_certificate(
        secure_broker, clients, protocol, case, broker_says):
    pki = secure_broker.pki
    tls = pki.tls() if case == "no client certificate" else pki.tls(rogue_client=True)
    since = secure_broker.log_size()
    with pytest.raises(BrokerError, match=secure_broker.url_mtls):
        _connect(clients, secure_broker.url_mtls, protocol, tls, timeout_s=REFUSED_TIMEOUT_S)
    secure_broker.wait_for_log(broker_says, since=since)


@pytest.mark.broker
def test_a_missing_client_certificate_is_named_in_the_error(secure_broker, clients):
    with pytest.raises(BrokerError, match="certificate"):
        _connect(clients, secure_broker.url_mtls, "5", secure_broker.pki.tls(),
                 timeout_s=REFUSED_TIMEOUT_S)


# -- username / password --------------------------------------------------------------
def _needs_password_listener(broker) -> None:
    if broker.password_unavailable:
        pytest.skip(f"password listener not started: {broker.password_unavailable}")


@pytest.mark.broker
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_right_password_carries_traffic(secure_broker, clients, unique_device, protocol):
    _needs_password_listener(secure_broker)
    client = _connect(clients, secure_broker.url_password, protocol)
    _round_trip(client, f"test/{unique_device}/password")


@pytest.mark.broker
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", ["wrong password", "unknown user", "no credentials"])
def test_bad_credentials_get_a_refused_connack_naming_the_broker(secure_broker, clients,
                                                                 protocol, case):
    _needs_password_listener(secure_broker)
    url = {"wrong password": secure_broker.password_url(USERNAME, "not-" + PASSWORD),
           "unknown user": secure_broker.password_url("mallory", PASSWORD),
           "no credentials": secure_broker.url_password_anonymous}[case]
    with pytest.raises(BrokerError, match="refused the connection") as excinfo:
        _connect(clients, url, protocol)
    message = str(excinfo.value)
    assert f"127.0.0.1:{secure_broker.ports['password']}" in message
    assert "Not authorized" in message
    assert PASSWORD not in message  # a log line must not leak the password


@given(username=st.text(min_size=1, max_size=30), password=st.text(min_size=1, max_size=30))
def test_credentials_survive_the_url_round_trip(username, password):
    url = BrokerURL.parse(credentials_url(1884, username, password))
    assert (url.username, url.password, url.port) == (username, password, 1884)


# -- TLSConfig errors (no broker needed) ----------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_a_missing_tls_file_names_its_config_key(pki, tmp_path, key):
    files = {"ca_file": pki.ca_cert, "cert_file": pki.client_cert, "key_file": pki.client_key}
    files[key] = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=rf"broker\.{key}=.*missing\.pem.*no such file"):
        make_client(BrokerURL.parse("mqtts://127.0.0.1:8883"), tls=TLSConfig(**files))


@pytest.mark.parametrize("given_key", ["cert_file", "key_file"])
def test_a_client_certificate_needs_its_key_and_vice_versa(pki, given_key):
    path = pki.client_cert if given_key == "cert_file" else pki.client_key
    with pytest.raises(ConfigError, match=r"broker\.cert_file and broker\.key_file"):
        TLSConfig(ca_file=pki.ca_cert, **{given_key: path})


def test_a_key_that_does_not_match_the_certificate_is_a_config_error(pki):
    tls = TLSConfig(pki.ca_cert, pki.client_cert, pki.rogue_client_key)
    with pytest.raises(ConfigError, match="client.crt"):
        tls.context()


def test_tls_files_with_a_plain_mqtt_url_are_refused(pki):
    with pytest.raises(ConfigError, match="use mqtts://"):
        make_client(BrokerURL.parse("mqtt://127.0.0.1:1883"), tls=TLSConfig(pki.ca_cert))


def test_secure_mosquitto_refuses_unknown_listener_modes(pki, tmp_path):
    with pytest.raises(ConfigError, match="'websockets'"):
        SecureMosquitto(tmp_path, pki, modes=("tls", "websockets"))
