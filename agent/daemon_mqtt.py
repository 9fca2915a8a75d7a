"""The daemon's paho callbacks (network thread: they only enqueue and flip flags, never
block) and its acknowledgements (a mixin of `Daemon`)."""

from __future__ import annotations

import logging
import queue
import socket
import time

from agent.worker import Inbound

log = logging.getLogger("reverie.daemon")
_WAKE = object()              # put in the frame queue to wake the worker for a label/command
MAX_CONTROL = 4096            # queued labels/commands (QoS 1 ones are bounded by the broker)


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


class MqttCallbacks:
    """Needs the Daemon's topics, metrics, queues, events, outbox and client."""

    def _on_connect(self, client, _userdata, flags, reason_code, _props) -> None:
        if reason_code.is_failure:
            log.warning("connection refused by broker: %s", reason_code)
            return
        with self._lock:
            self._gen += 1
        set_nodelay(client)
        self._connects += 1
        if self._connects > 1:
            self.metrics.reconnects.inc()
        t = self.topics
        _rc, self._sub_mid = client.subscribe([(t.frames, 0), (t.labels, 1), (t.cmd, 1)])
        self._connected.set()
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
        self._connected.clear()
        self._subscribed.clear()
        self.metrics.connected.set(0)
        self.outbox.set_offline()
        if not self._stop.is_set():
            log.warning("disconnected (%s); reconnecting", reason_code)

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
        item = Inbound(kind, device, msg.topic, msg.payload, time.monotonic(), msg.mid,
                       msg.qos, self._gen, getattr(msg, "properties", None))
        if kind == "frames":
            try:
                self._frames.put_nowait(item)
            except queue.Full:
                self._queue_full.inc()
                self.ack_now(msg.mid, msg.qos)
                return
        elif kind in ("labels", "cmd"):
            if msg.qos == 0 and len(self._control) >= MAX_CONTROL:
                self.metrics.dropped.inc(reason="control_queue_full")
                return
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

