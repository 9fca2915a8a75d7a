"""Outgoing messages while the broker is away: buffered up to a bound, then flushed in order.

paho drops QoS 0 publications made while disconnected (and keeps QoS 1 ones itself). The
daemon publishes everything through an `Outbox`: connected and with nothing waiting, a
message goes straight to paho; otherwise it waits in a bounded FIFO (the oldest is
dropped and counted when full, so an agent cut off for a day cannot run out of memory)
and `flush` sends it, in order, once the connection is back. Retained messages are kept
one per topic (a newer status replaces an older one).

Locking: paho is never called while the outbox lock is held, and the paho callbacks only
flip a flag (`set_online` / `set_offline`): the network thread never waits for us.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger("reverie.outbox")


class Outbox:
    def __init__(self, client, max_messages: int, on_drop: Callable[[int], None] | None = None):
        if max_messages < 1:
            raise ValueError(f"max_messages={max_messages}, expected >= 1")
        self.client = client
        self.max_messages = max_messages
        self._buf: deque = deque()
        self._retained: dict[str, tuple] = {}
        self._lock = threading.Lock()
        self._online = False
        self._on_drop = on_drop or (lambda n: None)
        self.dropped = 0
        self.sent = 0

    def __len__(self) -> int:
        return len(self._buf) + len(self._retained)

    @property
    def online(self) -> bool:
        return self._online

    def set_online(self) -> None:
        """From paho's on_connect: only a flag; the owner calls `flush`."""
        self._online = True

    def set_offline(self) -> None:
        self._online = False

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                properties=None) -> None:
        msg = (topic, payload, qos, retain, properties)
        with self._lock:
            direct = self._online and not self._buf and not self._retained
            if not direct:
                self._queue(msg)
        if direct and not self._send(msg):
            with self._lock:
                self._queue(msg)

    def _queue(self, msg) -> None:      # caller holds the lock
        if msg[3]:
            self._retained[msg[0]] = msg
            return
        if len(self._buf) >= self.max_messages:
            self._buf.popleft()
            self.dropped += 1
            self._on_drop(1)
        self._buf.append(msg)

    def flush(self) -> int:
        """Send what waited, in order (retained first); returns how many were sent."""
        if not self._online:
            return 0
        with self._lock:
            todo = list(self._retained.values()) + list(self._buf)
            self._retained.clear()
            self._buf.clear()
        n = 0
        for i, msg in enumerate(todo):
            if not self._send(msg):
                with self._lock:       # put the rest back in front, in order
                    rest = todo[i:]
                    for m in reversed([m for m in rest if not m[3]]):
                        self._buf.appendleft(m)
                    for m in rest:
                        if m[3]:
                            self._retained.setdefault(m[0], m)
                break
            n += 1
        if n:
            log.info("sent %d message(s) buffered while offline", n)
        return n

    def _send(self, msg) -> bool:
        """Hand one message to paho; False if it must wait (offline, paho's queue full)."""
        from paho.mqtt.client import MQTT_ERR_NO_CONN, MQTT_ERR_QUEUE_SIZE

        topic, payload, qos, retain, props = msg
        try:
            info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except (ValueError, RuntimeError) as exc:   # e.g. a topic paho refuses: not retryable
            log.warning("cannot publish to %s: %s", topic, exc)
            return True
        if info.rc == MQTT_ERR_NO_CONN and qos == 0:
            self._online = False
            return False
        if info.rc == MQTT_ERR_QUEUE_SIZE:
            return False
        # QoS 1 while the connection just dropped: paho keeps it and resends on reconnect.
        self.sent += 1
        return True
