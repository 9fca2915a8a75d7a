"""MQTT connection settings and paho client construction, shared by agent and firmware_sim.

Broker URLs: ``mqtt://[user[:password]@]host[:port]`` (default port 1883) and
``mqtts://...`` (TLS, default port 8883).
"""

from __future__ import annotations

import ssl
import uuid
from dataclasses import dataclass
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
        parts = urlsplit(url)
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


def make_client(url: BrokerURL, *, client_id: str | None = None, protocol: str = "5",
                clean_start: bool = True):
    """A paho-mqtt 2.x client (callback API v2) configured for `url`; not yet connected."""
    import paho.mqtt.client as mqtt

    proto = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311, "311": mqtt.MQTTv311}.get(str(protocol))
    if proto is None:
        raise ConfigError(f"Invalid MQTT protocol: {protocol!r} (expected '5' or '3.1.1')")
    cid = client_id or f"reverie-{uuid.uuid4().hex[:12]}"
    kwargs = {} if proto == mqtt.MQTTv5 else {"clean_session": clean_start}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto, **kwargs)
    if url.username:
        client.username_pw_set(url.username, url.password)
    if url.tls:
        client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
    return client
