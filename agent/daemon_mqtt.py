"""The daemon's paho callbacks (network thread: they only enqueue and flip flags, never
block) and its acknowledgements (a mixin of `Daemon`), and `ConnectionReport`: what the
log says while the broker cannot be reached."""

from __future__ import annotations

import logging
import queue
import socket
import sys
import threading
import time

from agent.commands import MAX_COMMAND_BYTES
from agent.mqtt import protocol_hint
from agent.worker import Inbound

log = logging.getLogger("reverie.daemon")
_WAKE = object()              # put in the frame queue to wake the worker for a label/command
MAX_CONTROL = 4096            # queued labels/commands (QoS 1 ones are bounded by the broker)
PACKET_OVERHEAD = 64 * 1024   # topic (at most 65,535 bytes) and properties around a payload


class ByteBudget:
    """Bytes of payload queued for the worker: the network thread takes, the worker
    releases. `take` refuses beyond `max_bytes` (``force``: counts it anyway, for QoS 1
    messages the broker's in-flight window already bounds).

    >>> b = ByteBudget(10)
    >>> b.take(8), b.take(4), b.take(2)
    (True, False, True)
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int, *, force: bool = False) -> bool:
        with self._lock:
            if not force and self.used + n > self.max_bytes:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.used = max(0, self.used - n)


def set_nodelay(client) -> None:
    """TCP_NODELAY on the client's socket: paho leaves Nagle on, which holds small
    publications (a prediction) back for up to 40 ms waiting for an ACK."""
    sock = client.socket()
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):   # e.g. an SSL socket wrapper without it: not fatal
        pass


SILENCE_S = 3.0               # no answer at all from the broker this long: say so


class ConnectionReport:
    """One log line when the broker cannot be reached, then one per backoff step (after 2,
    4, 8, ... failed attempts), not one per attempt; and one when it connects again.

    >>> r = ConnectionReport("mqtt://127.0.0.1:1", "5", clock=lambda: 0.0)
    >>> [r.failed("Connection refused") is not None for _ in range(5)]
    [True, True, False, True, False]
    """

    def __init__(self, url: object, protocol: str, *, backoff_max_s: float = 1.5,
                 clock=time.monotonic):
        self.url, self.protocol, self.backoff_max_s = str(url), protocol, backoff_max_s
        self._clock = clock
        self.failures = 0
        self.since: float = clock()          # start of the current outage (or of the run)
        self._next_line = 1
        self._silence_said = False

    def failed(self, reason: str) -> str | None:
        """Count a failed attempt; the line to log now, or None."""
        self.failures += 1
        if self.failures < self._next_line:
            return None
        self._next_line *= 2
        took = self._clock() - self.since
        if self.failures == 1:
            return (f"cannot reach the broker at {self.url}: {reason}"
                    f"{protocol_hint(self.protocol, reason)}; retrying with backoff up to "
                    f"{self.backoff_max_s:g} s")
        return (f"still cannot reach the broker at {self.url} after {self.failures} attempts "
                f"in {took:.0f} s: {reason}{protocol_hint(self.protocol, reason)}; retrying at "
                f"least every {self.backoff_max_s:g} s")

    def silent(self, tcp_open: bool) -> str | None:
        """No attempt finished yet (an unanswered connect): the line to log, once.
        `tcp_open`: the TCP connection is up, only the CONNACK is missing."""
        if self.failures or self._silence_said or self._clock() - self.since < SILENCE_S:
            return None
        self._silence_said = True
        if tcp_open:
            return (f"the broker at {self.url} accepted the TCP connection but sent no "
                    f"CONNACK within {SILENCE_S:g} s"
                    f"{protocol_hint(self.protocol, 'no reply before CONNACK')}; still waiting")
        return (f"no answer from the broker at {self.url} within {SILENCE_S:g} s; still "
                "trying (is the host reachable, the port right?)")

    def connected(self) -> str | None:
        """The outage is over: a line if there was one; the next outage starts afresh."""
        line = None
        if self.failures:
            line = (f"reached the broker at {self.url} after {self.failures} failed "
                    f"attempt(s) in {self._clock() - self.since:.1f} s")
        self.failures, self._next_line, self._silence_said = 0, 1, True
        return line

    def lost(self) -> None:
        """Connected until now: the next failures start a new outage."""
        self.since, self.failures, self._next_line = self._clock(), 0, 1
        self._silence_said = False


class MqttCallbacks:
    """Needs the Daemon's topics, metrics, queues, events, outbox and client."""

    def _on_pre_connect(self, _client, _userdata) -> None:
        self._connack = False             # per attempt: did this one get a CONNACK?

    def _on_connect_fail(self, _client, _userdata) -> None:
        """A TCP/TLS connect failed (paho calls this inside its ``except OSError``)."""
        exc = sys.exc_info()[1]
        reason = (f"{exc.strerror or exc}" if isinstance(exc, OSError) else "connection failed")
        self._connection_failed(reason)

    def _connection_failed(self, reason: str) -> None:
        line = self.conn_report.failed(reason)
        if line is not None:
            log.warning("%s", line)

    def _on_connect(self, client, _userdata, flags, reason_code, _props) -> None:
        self._connack = True
        if reason_code.is_failure:
            self._connection_failed(f"the broker refused the connection: {reason_code}")
            return
        line = self.conn_report.connected()
        if line is not None:
            log.info("%s", line)
        with self._lock:
            self._gen += 1
        set_nodelay(client)
        self._connects += 1
        if self._connects > 1:
            self.metrics.reconnects.inc()
        t = self.topics
        _rc, self._sub_mid = client.subscribe([(t.frames, 0), (t.labels, 1), (t.cmd, 1)])
        self._connected.set()
        self._last_health = 0.0       # the next tick rewrites the health file: "connected" at once
        self.metrics.connected.set(1)
        self.outbox.set_online()
        self._status_dirty.set()      # the main loop publishes "online" and flushes
        log.info("connected (session present: %s); subscribed to %s, %s, %s",
                 getattr(flags, "session_present", None), t.frames, t.labels, t.cmd)

    def _on_subscribe(self, _client, _userdata, mid, reason_codes, _props) -> None:
        if mid != self._sub_mid:
            return
        bad = [str(rc) for rc in reason_codes if rc.is_failure]
        if bad:
            log.error("the broker refused subscriptions (%s): check its ACL for %s",
                      ", ".join(bad), self.topics.frames)
        self._subscribed.set()

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        self.metrics.connected.set(0)
        self.outbox.set_offline()
        if self._stop.is_set():
            return
        if was_connected:
            self.conn_report.lost()
            log.warning("disconnected from %s (%s); reconnecting", self.config.broker.url,
                        reason_code)
        elif not getattr(self, "_connack", True):
            self._connection_failed(f"the broker closed the connection before CONNACK "
                                    f"({reason_code})")

    def _on_message(self, _client, _userdata, msg) -> None:
        try:
            device, kind = self.topics.parse(msg.topic)
        except ValueError as exc:
            self.metrics.dropped.inc(reason="bad_topic")
            log.warning("%s", exc)
            self.ack_now(msg.mid, msg.qos)
            return
        counter = self._received.get(kind)
        if counter is not None:
            counter.inc()
        if self._closed.is_set():           # shutting down: a label stays unacked, redelivered
            return
        # Sizes are checked before anything is queued: an oversized payload is not kept
        # (the worker reports it from its size), and the queues are bounded in bytes.
        payload = msg.payload
        size = len(payload)
        if size > (MAX_COMMAND_BYTES if kind == "cmd" else self.config.ingest.max_payload_bytes):
            payload = b""
        item = Inbound(kind, device, msg.topic, payload, time.monotonic(), msg.mid,
                       msg.qos, self._gen, getattr(msg, "properties", None), size=size)
        if kind == "frames":
            if not self.queued_bytes.take(len(payload)):
                self._queue_full.inc()
                return
            try:
                self._frames.put_nowait(item)
            except queue.Full:
                self.queued_bytes.release(len(payload))
                self._queue_full.inc()
                self.ack_now(msg.mid, msg.qos)
                return
        elif kind in ("labels", "cmd"):
            # QoS 1 ones are bounded by the broker's in-flight window (Receive Maximum),
            # QoS 0 ones by count and bytes here.
            if msg.qos == 0 and (len(self._control) >= MAX_CONTROL
                                 or not self.queued_bytes.take(len(payload))):
                self.metrics.dropped.inc(reason="control_queue_full")
                return
            if msg.qos != 0:
                self.queued_bytes.take(len(payload), force=True)
            self._control.append(item)
            try:                             # wake the worker (full: it is busy anyway)
                self._frames.put_nowait(_WAKE)
            except queue.Full:
                pass
        else:                                # one of our own outbound kinds: ignore
            self.ack_now(msg.mid, msg.qos)

    def _on_publish(self, _client, _userdata, mid, reason_code, _props) -> None:
        """MQTT 5: the broker refused one of our QoS 1 publications (e.g. its ACL does not
        let the agent write a reply or status topic): count it, say so."""
        if getattr(reason_code, "is_failure", False):
            self.metrics.dropped.inc(reason="publish_refused")
            log.warning("the broker refused publication mid=%d: %s (check its ACL for the "
                        "agent's outbound topics)", mid, reason_code)

    def ack_now(self, mid: int, qos: int) -> None:
        if qos == 1:
            self._client.ack(mid, qos)

    def ack(self, msg: Inbound) -> None:
        """PUBACK a QoS 1 message, on the connection it arrived on only (after a reconnect
        the broker redelivers it under a new packet id; the label key deduplicates)."""
        if msg.qos != 1:
            return
        with self._lock:
            if msg.gen != self._gen or not self._connected.is_set():
                return
        self._client.ack(msg.mid, msg.qos)

