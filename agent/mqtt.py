"""MQTT connection settings and paho client construction, shared by agent and firmware_sim.

Broker URLs: ``mqtt://[user[:password]@]host[:port]`` (default port 1883) and
``mqtts://...`` (TLS, default port 8883).
"""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from agent.errors import ConfigError

SCHEMES = {"mqtt": (1883, False), "tcp": (1883, False), "mqtts": (8883, True), "ssl": (8883, True)}


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        """Parse a broker URL; ConfigError names the bad part.

        >>> BrokerURL.parse("mqtt://127.0.0.1:1884")
        BrokerURL(host='127.0.0.1', port=1884, tls=False, username=None, password=None)
        """
        if not isinstance(url, str) or "://" not in url:
            raise ConfigError(f"Invalid broker URL: {url!r} (expected mqtt://HOST[:PORT])")
        try:
            parts = urlsplit(url)
        except ValueError as exc:           # e.g. "mqtt://[::1:1883": an unclosed IPv6 bracket
            raise ConfigError(f"Invalid broker URL: {url!r} ({exc})") from None
        if parts.scheme not in SCHEMES:
            raise ConfigError(
                f"Invalid broker URL: {url!r} (scheme {parts.scheme!r}, expected one of {sorted(SCHEMES)})")
        default_port, tls = SCHEMES[parts.scheme]
        try:
            port = parts.port or default_port
        except ValueError:
            raise ConfigError(f"Invalid broker URL: {url!r} (bad port)") from None
        if not parts.hostname:
            raise ConfigError(f"Invalid broker URL: {url!r} (no host)")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"Invalid broker URL: {url!r} (unexpected path or query)")
        return cls(parts.hostname, port, tls,
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None)

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings for an ``mqtts://`` broker.

    ``ca_file``: CA certificate(s) that signed the broker's certificate (None: the system's
    CAs). ``cert_file`` + ``key_file``: the client's own certificate for mutual TLS.
    ``insecure``: skip the host-name check (a broker reached by an IP its certificate does
    not name); the chain is still verified.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert_file", "key_file"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, Path(v))
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("broker.cert_file and broker.key_file: give both (mutual TLS) "
                              "or neither")

    def check_files(self) -> None:
        """ConfigError naming the key whose file is missing or unreadable."""
        for name in ("ca_file", "cert_file", "key_file"):
            v = getattr(self, name)
            if v is not None and not v.is_file():
                raise ConfigError(f"broker.{name}={str(v)!r}: no such file")

    def context(self) -> ssl.SSLContext:
        self.check_files()
        try:
            ctx = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file else None)
            if self.cert_file is not None:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"broker TLS files (ca_file={self.ca_file}, cert_file="
                              f"{self.cert_file}, key_file={self.key_file}): {exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.insecure:
            ctx.check_hostname = False
        return ctx


def protocol_hint(protocol: str, reason: str) -> str:
    """The fix to suggest (with a leading space), or "", for a connection to a broker
    speaking `protocol` that was refused or dropped before CONNACK for `reason`.

    >>> protocol_hint("5", "closed the connection before CONNACK")[:40]
    ' (a broker that only speaks MQTT 3.1.1 r'
    """
    low = reason.lower()
    if protocol == "5" and ("protocol" in low or "before connack" in low):
        return (" (a broker that only speaks MQTT 3.1.1 refuses, drops or ignores an MQTT 5 "
                "client: try --protocol 3.1.1)")
    if "not authorized" in low or "bad user name" in low or "password" in low:
        return " (check broker.username and broker.password / password_file)"
    return ""



def make_client(url: BrokerURL, *, client_id: str | None = None, protocol: str = "5",
                clean_start: bool = True, tls: TLSConfig | None = None,
                manual_ack: bool = False):
    """A paho-mqtt 2.x client (callback API v2) configured for `url`; not yet connected.

    ``clean_start=False`` with MQTT 3.1.1 asks for a persistent session (clean session
    off); with MQTT 5 the session is chosen at connect time (see `connect_properties`).
    ``manual_ack``: QoS 1 messages are acknowledged only when the caller calls
    ``client.ack(mid, qos)``.
    """
    import paho.mqtt.client as mqtt

    proto = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311, "311": mqtt.MQTTv311}.get(str(protocol))
    if proto is None:
        raise ConfigError(f"Invalid MQTT protocol: {protocol!r} (expected '5' or '3.1.1')")
    cid = client_id or f"reverie-{uuid.uuid4().hex[:12]}"
    kwargs = {} if proto == mqtt.MQTTv5 else {"clean_session": clean_start}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto,
                         manual_ack=manual_ack, **kwargs)
    if url.username:
        client.username_pw_set(url.username, url.password)
    if url.tls:
        client.tls_set_context((tls or TLSConfig()).context())
    elif tls is not None and (tls.ca_file or tls.cert_file):
        raise ConfigError(f"broker.url={str(url)!r} is plain MQTT but TLS files are set: "
                          "use mqtts://")
    return client


def connect_properties(protocol: str, session_expiry_s: int | None,
                       receive_maximum: int | None = None,
                       maximum_packet_size: int | None = None):
    """CONNECT properties for MQTT 5 (session expiry, receive maximum, maximum packet
    size: the broker does not send us larger packets), None for 3.1.1 or when none is set."""
    if str(protocol) != "5" or not (session_expiry_s or receive_maximum or maximum_packet_size):
        return None
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    if session_expiry_s:
        props.SessionExpiryInterval = int(session_expiry_s)
    if receive_maximum:
        props.ReceiveMaximum = int(receive_maximum)
    if maximum_packet_size:
        props.MaximumPacketSize = int(maximum_packet_size)
    return props


def connect_and_wait(client, url: BrokerURL, *, timeout_s: float = 10.0, keepalive: int = 30,
                     clean_start: bool | int = True, properties=None) -> None:
    """Connect, start the network loop and wait for a successful CONNACK.

    Raises BrokerError naming the broker on a refused CONNACK, a connection dropped
    before CONNACK (e.g. a TLS 1.3 broker rejecting the client certificate after the
    handshake: the reason paho logged is quoted) or a timeout. The client's own
    ``on_connect`` (if any) still runs.
    """
    from agent.errors import BrokerError

    done = threading.Event()
    result: dict = {}
    saved = (client.on_connect, client.on_disconnect, client.on_connect_fail, client.on_log)

    def _on_connect(c, userdata, flags, reason_code, props):
        result["rc"] = reason_code
        done.set()
        if saved[0] is not None:
            saved[0](c, userdata, flags, reason_code, props)

    def _on_disconnect(c, userdata, flags, reason_code, props):
        result.setdefault("dropped", f"connection closed before CONNACK ({reason_code})")
        done.set()

    def _on_connect_fail(c, userdata):
        result.setdefault("dropped", "connection failed")
        done.set()

    def _on_log(c, userdata, level, buf):
        if "error" in buf.lower() or "ssl" in buf.lower():
            result["log"] = buf
        if saved[3] is not None:
            saved[3](c, userdata, level, buf)

    def _restore():
        client.on_connect, client.on_disconnect, client.on_connect_fail, client.on_log = saved

    client.on_connect, client.on_disconnect = _on_connect, _on_disconnect
    client.on_connect_fail, client.on_log = _on_connect_fail, _on_log
    try:
        kw = {}
        if client.protocol == 5:
            kw = {"clean_start": clean_start, "properties": properties}
        client.connect(url.host, url.port, keepalive=keepalive, **kw)
    except (OSError, ValueError) as exc:
        _restore()
        raise BrokerError(f"cannot connect to {url}: {exc}") from None
    client.loop_start()
    ok = done.wait(timeout_s)
    if ok and "rc" not in result:          # dropped before CONNACK: give paho a moment to log why
        time.sleep(0.05)
    _restore()
    if not ok or "rc" not in result:
        client.disconnect()
        client.loop_stop()
        why = result.get("dropped", f"no CONNACK within {timeout_s:g} s")
        if "log" in result:
            why += f": {result['log']}"
        if url.tls and "dropped" in result:
            why += (" (a TLS broker that closes the connection right after the handshake "
                    "usually refused the client certificate: check broker.cert_file and "
                    "broker.key_file, and that the broker trusts their CA)")
        raise BrokerError(f"broker {url}: {why}")
    rc = result["rc"]
    if rc.is_failure:
        client.disconnect()
        client.loop_stop()
        raise BrokerError(f"broker {url} refused the connection: {rc}")
