"""The simulator engine: one pacing loop and one MQTT client for any number of devices.

Every front end (`firmware_sim.sim.Simulator`, `firmware_sim.runner.ScenarioRunner`,
`firmware_sim.replay.Replay`) is a *producer*: ``produce(i, k, t_s, out)`` makes frame ``k``
of device ``i`` and appends the messages to publish now to ``out``. The engine decides when.

Pacing. All devices share one frame period ``P = frame_samples / rate_hz`` (stream seconds)
and are staggered evenly within it, so the broker sees a steady flow instead of N frames at
once: slot ``j = k * n + i`` (frame ``k`` of device ``i``) is due at stream time
``(k + 1 + i / n) * P`` (a sensor sends a frame once its last sample is taken), i.e. at wall
time ``t0 + due / speed``. Deadlines are absolute, so timing errors never accumulate
(no drift); a loop that falls behind produces the late slots at once and reports the lag
(`SimStats.max_lag_s`); at a `speed` the machine cannot sustain, the loop simply runs
flat out and ``SimStats.speed_achieved`` says how fast that was.

One thread does everything. The paho client runs *without* its network thread: the loop
calls ``client.loop(timeout)`` while it waits for the next deadline (keep-alive, PUBACKs of
QoS 1 labels and commands) and every `SERVICE_EVERY` slots when it has no time to wait. A
publish with no network thread writes to the socket at once (no thread hand-off, no GIL
ping-pong: ~9 us per frame here against ~11 us with ``loop_start``). Frames go out with
QoS 0; when the socket's send buffer is full the loop blocks until the broker drains it,
so a slow broker shows up as lag (back-pressure), never as an unbounded queue in memory.
A lost connection is retried once a second; frames produced meanwhile are counted as
dropped (their seq is skipped, as on a device that streams live).
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from agent.errors import BrokerError, ConfigError
from agent.mqtt import BrokerURL, make_client

PROTOCOLS = ("5", "3.1.1")
SERVICE_EVERY = 64  # slots between network services when the loop has no time to wait
MAX_WAIT_S = 0.05  # longest single wait: bounds the reaction time to stop()
EARLY_S = 0.0005  # a slot due this soon is produced now rather than after a wait
RECONNECT_S = 1.0

# (topic, payload, qos, device index for a frame of that device or -1 for anything else)
Message = tuple[str, bytes, int, int]
# produce(device index, frame index k, stream time t_s of the frame's end, out)
Producer = Callable[[int, int, float, list], None]
# finish(stream time t_s, out) -> the stream time to be called again, or None: done
Finisher = Callable[[float, list], float | None]


@dataclass(frozen=True)
class SimStats:
    """What one run sent, and how well it kept time.

    Rates are per device in samples per wall-clock second, measured between each device's
    first and last frame (free of the start-up and of the stagger between devices).
    """

    frames_sent: dict[str, int]  # per device: frames the client accepted
    frames_dropped: int  # frames refused (not connected); their seq is skipped
    bytes_sent: int  # frame payload bytes
    elapsed_s: float  # wall time from the start to the last frame
    sample_rate_hz: float  # achieved, mean over devices (0 with fewer than 2 frames)
    target_sample_rate_hz: float  # rate_hz * speed
    max_lag_s: float  # worst delay of a frame behind its deadline
    min_sample_rate_hz: float = 0.0  # achieved by the slowest device
    stream_s: float = 0.0  # stream time covered (the last frame's end)
    messages_sent: int = 0  # everything accepted: frames, labels, commands

    @property
    def speed_achieved(self) -> float:
        """Stream seconds per wall second (the requested `speed` when the loop kept up)."""
        return self.stream_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def within(self, tolerance: float = 0.01) -> bool:
        """Did every device reach the target rate within `tolerance` (relative)?"""
        return self.min_sample_rate_hz >= self.target_sample_rate_hz * (1 - tolerance)


@dataclass
class _Tally:
    """What a run published so far."""

    sent: list[int]  # frames per device index
    dropped: int = 0
    bytes: int = 0
    messages: int = 0
    pending: list = field(default_factory=list)  # QoS 1 infos, maybe not yet acknowledged


def check_speed(speed: float) -> float:
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not (
            math.isfinite(speed) and speed > 0):
        raise ConfigError(f"Invalid speed: {speed!r} (expected a finite number > 0)")
    return float(speed)


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"Invalid MQTT protocol: {protocol!r} (expected one of {PROTOCOLS})")
    return protocol


class Engine:
    """Paces `produce` for `devices` and publishes what it returns; see the module docstring.

    `stream_end_s`: no slot due after this stream time is produced; `max_frames`: frames
    per device (both None: until `stop`). After the last slot, ``finish(t_s, out)``
    appends the final messages (frames a network model held back, labels still due) and
    returns the stream time at which it wants to be called again (None: done); the engine
    keeps time for it like for slots. A `stop` ends that too.
    `run` blocks; `start` / `stop` / `join` run the loop in a background thread. Both
    connect first and raise BrokerError if the broker does not accept the connection
    within `connect_timeout_s`. An engine runs once.
    """

    def __init__(self, broker_url: str, devices: Sequence[str], produce: Producer, *,
                 rate_hz: float, frame_samples: int, speed: float = 1.0,
                 stream_end_s: float | None = None, max_frames: int | None = None,
                 finish: Finisher | None = None, protocol: str = "5",
                 connect_timeout_s: float = 5.0, name: str = "reverie-sim"):
        self.broker = BrokerURL.parse(broker_url)
        self.devices = tuple(devices)
        self.produce = produce
        self.rate_hz = rate_hz
        self.frame_samples = frame_samples
        self.speed = check_speed(speed)
        self.stream_end_s = stream_end_s
        self.max_frames = max_frames
        self.finish = finish
        self.protocol = check_protocol(protocol)
        self.connect_timeout_s = connect_timeout_s
        self.name = name
        self._stop = threading.Event()
        self._done = threading.Event()  # set when the background run has finished
        self._client = None
        self._connected = False
        self._thread: threading.Thread | None = None
        self._stats: SimStats | None = None
        self._error: BaseException | None = None

    @property
    def frame_period_s(self) -> float:
        """Stream seconds per frame."""
        return self.frame_samples / self.rate_hz

    def slots(self) -> Iterator[tuple[int, int, float]]:
        """``(device index, frame index, due stream time)`` in production order, endless
        or up to `stream_end_s` / `max_frames`."""
        n, period = len(self.devices), self.frame_period_s
        j = 0
        while True:
            k, i = divmod(j, n)
            if self.max_frames is not None and k >= self.max_frames:
                return
            due = (k + 1 + i / n) * period
            if self.stream_end_s is not None and due > self.stream_end_s + 1e-9:
                return
            yield i, k, due
            j += 1

    def dry_run(self, stream_s: float | None = None) -> Iterator[tuple[float, Message]]:
        """What a run would publish, ``(due stream time, message)`` in order, unpaced and
        without a broker (tests, baselines). Consumes the producer like a run does."""
        out: list = []
        due = 0.0
        for i, k, due in self.slots():  # noqa: B007 - `due` is used after the loop
            if stream_s is not None and due > stream_s + 1e-9:
                return
            self.produce(i, k, due, out)
            yield from ((due, msg) for msg in out)
            out.clear()
        t_s = due
        while self.finish is not None and t_s is not None:
            again = self.finish(t_s, out)
            yield from ((t_s, msg) for msg in out)
            out.clear()
            t_s = again

    # --- running -------------------------------------------------------------

    def run(self) -> SimStats:
        """Connect, publish until `stream_end_s` or `stop`, disconnect."""
        self._connect()
        try:
            return self._loop()
        finally:
            self._disconnect()

    def start(self) -> None:
        """Connect (raising BrokerError here), then run the loop in a background thread."""
        self._connect()
        self._thread = threading.Thread(target=self._run_thread, name=self.name, daemon=True)
        self._thread.start()

    def _run_thread(self) -> None:
        try:
            self._stats = self._loop()
        except BaseException as exc:  # handed to join()
            self._error = exc
        finally:
            self._disconnect()
            self._done.set()

    def stop(self) -> None:
        """Ask the loop to finish; safe from any thread and before the start."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> SimStats | None:
        """Wait for the background run; its stats, or None if still running after `timeout`.

        An exception raised in the background thread is raised here.
        """
        if self._thread is None:
            raise RuntimeError(f"{self.name}: join() called before start()")
        # Wait on an Event, not Thread.join: a Ctrl-C inside Thread.join(timeout) can leave
        # the thread marked as finished while it still runs (CPython 3.11).
        if not self._done.wait(timeout):
            return None
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._stats

    # --- MQTT ----------------------------------------------------------------

    def _connect(self) -> None:
        if self._client is not None:
            raise RuntimeError(f"{self.name} runs once; create a new one")
        client = make_client(self.broker, client_id=f"{self.name}-{uuid.uuid4().hex[:8]}",
                             protocol=self.protocol)
        client.max_inflight_messages_set(100)  # QoS 1 labels and commands; frames are QoS 0
        self._client = client
        result = []

        def on_connect(client, userdata, flags, reason_code, properties):
            result.append(reason_code)
            self._connected = not reason_code.is_failure

        def on_disconnect(client, userdata, flags, reason_code, properties):
            self._connected = False

        client.on_connect, client.on_disconnect = on_connect, on_disconnect
        try:
            client.connect(self.broker.host, self.broker.port, keepalive=30)
        except OSError as exc:
            raise BrokerError(f"Cannot connect to MQTT broker {self.broker}: {exc}") from None
        deadline = time.monotonic() + self.connect_timeout_s
        error = None
        while not result and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != 0:
                error = f"MQTT broker {self.broker} closed the connection before CONNACK"
                break
        if error is None and not result:
            error = f"No CONNACK from MQTT broker {self.broker} within {self.connect_timeout_s} s"
        elif error is None and result[0].is_failure:
            error = f"MQTT broker {self.broker} refused the connection: {result[0]}"
        if error is not None:
            client.disconnect()  # closes the socket
            raise BrokerError(error)

    def _disconnect(self) -> None:
        client = self._client
        if client is not None and self._connected:
            client.disconnect()
            client.loop(timeout=0.1)

    def _service(self, timeout: float, last_try: list[float]) -> None:
        """Network I/O for up to `timeout` s; a lost connection is retried once a second."""
        client = self._client
        if self._connected and client.loop(timeout=timeout) == 0:
            return
        self._connected = False
        now = time.monotonic()
        if now - last_try[0] >= RECONNECT_S:
            last_try[0] = now
            try:
                client.reconnect()
            except OSError:
                pass
            else:
                self._connected = True  # CONNACK pending; publishes queue meanwhile
                return
        self._stop.wait(timeout)

    def _publish(self, out: list, tally: _Tally) -> None:
        """Publish `out` (and clear it), counting into `tally`."""
        client = self._client
        for topic, payload, qos, dev in out:
            info = client.publish(topic, payload, qos=qos) if self._connected else None
            ok = info is not None and info.rc == 0
            if ok:
                tally.messages += 1
                if qos:
                    tally.pending.append(info)
            if dev >= 0:
                if ok:
                    tally.sent[dev] += 1
                    tally.bytes += len(payload)
                else:
                    tally.dropped += 1
        out.clear()
        if len(tally.pending) > 1000:  # forget the acknowledged ones now and then
            tally.pending = [i for i in tally.pending if not i.is_published()]

    def _wait_until(self, deadline: float, last_try: list[float]) -> float:
        """Serve the network until `deadline` (monotonic) or a stop; the time left (< 0: late)."""
        while (delay := deadline - time.monotonic()) > EARLY_S and not self._stop.is_set():
            self._service(min(delay, MAX_WAIT_S), last_try)
        return delay

    def _loop(self) -> SimStats:
        client, speed, n = self._client, self.speed, len(self.devices)
        tally = _Tally([0] * n)
        t_first = [0.0] * n  # wall time of each device's first and last frame
        t_last = [0.0] * n
        produced = [0] * n
        max_lag_s = stream_s = 0.0
        last_try = [0.0]
        out: list = []
        t_start = t_end = time.monotonic()
        since_service = 0
        for i, k, due in self.slots():
            if self._stop.is_set():
                break
            ahead = t_start + due / speed - time.monotonic()
            if ahead > EARLY_S:
                ahead = self._wait_until(t_start + due / speed, last_try)
                since_service = 0
            if self._stop.is_set():
                break
            max_lag_s = max(max_lag_s, -ahead)
            self.produce(i, k, due, out)
            self._publish(out, tally)
            t_end, stream_s = time.monotonic(), due
            if not produced[i]:
                t_first[i] = t_end
            t_last[i] = t_end
            produced[i] += 1
            since_service += 1
            # Back-pressure: a full socket send buffer blocks the loop, not memory.
            while self._connected and client.want_write() and not self._stop.is_set():
                self._service(MAX_WAIT_S, last_try)
                since_service = 0
            if since_service >= SERVICE_EVERY:
                self._service(0.0, last_try)
                since_service = 0
        t_s = stream_s
        while self.finish is not None and t_s is not None and not self._stop.is_set():
            self._wait_until(t_start + t_s / speed, last_try)
            again = self.finish(t_s, out)
            self._publish(out, tally)
            t_s = again
        self._flush(tally.pending)
        rates = [(produced[i] - 1) * self.frame_samples / (t_last[i] - t_first[i])
                 for i in range(n) if produced[i] > 1 and t_last[i] > t_first[i]]
        return SimStats(
            frames_sent=dict(zip(self.devices, tally.sent, strict=True)),
            frames_dropped=tally.dropped, bytes_sent=tally.bytes, elapsed_s=t_end - t_start,
            sample_rate_hz=sum(rates) / len(rates) if rates else 0.0,
            target_sample_rate_hz=self.rate_hz * speed, max_lag_s=max_lag_s,
            min_sample_rate_hz=min(rates) if len(rates) == n else 0.0,
            stream_s=stream_s, messages_sent=tally.messages)

    def _flush(self, pending_qos1: list, timeout_s: float = 2.0) -> None:
        """Write out what is queued and wait (bounded) for the QoS 1 acknowledgements."""
        client = self._client
        deadline = time.monotonic() + timeout_s
        while self._connected and time.monotonic() < deadline:
            if not client.want_write() and all(i.is_published() for i in pending_qos1):
                return
            if client.loop(timeout=0.02) != 0:
                return


class EngineDriven:
    """What a simulator that owns an `Engine` (``self.engine``) offers: `Simulator`,
    `ScenarioRunner` and `Replay` run, start, stop and join the same way."""

    engine: Engine

    def run(self) -> SimStats:
        """Connect, publish until the stream ends or `stop` is called, disconnect."""
        return self.engine.run()

    def start(self) -> None:
        """Connect (raising BrokerError here), then publish in a background thread."""
        self.engine.start()

    def stop(self) -> None:
        """Ask the loop to finish; safe from any thread and before the start."""
        self.engine.stop()

    def join(self, timeout: float | None = None) -> SimStats | None:
        """Wait for the background run; its stats, or None if still running after `timeout`.

        An exception raised in the background thread is raised here.
        """
        return self.engine.join(timeout)

    def dry_run(self, stream_s: float | None = None):
        """``(due stream s, (topic, payload, qos, device index))`` of everything a run
        would publish, unpaced, without a broker."""
        return self.engine.dry_run(stream_s)
