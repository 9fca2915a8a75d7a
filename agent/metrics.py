"""Prometheus metrics: counters, gauges and histograms rendered in text format 0.0.4.

A small stdlib-only implementation (no prometheus_client on the device). Design:

* A metric holds one value per label-value tuple in a dict guarded by one lock per
  metric. ``inc`` takes the lock, adds, releases: cheap enough for the hot path; bind the
  labels once with ``.labels(...)`` where a labelled metric is incremented per frame.
* ``render`` snapshots each metric under its own lock and formats outside it, so a scrape
  never stalls the daemon for longer than a dict copy.
* ``gauge_fn`` / ``counter_fn`` values are computed at scrape time. One that raises (or
  returns a malformed value) is logged once and left out of that scrape; the rest of the
  page is still served.
* ``MetricsServer`` serves ``/metrics`` and ``/healthz`` from a ThreadingHTTPServer on a
  daemon thread, without per-request logging.

>>> reg = Registry()
>>> reg.counter("jobs_total", "Jobs done.").inc()
>>> print(reg.render().decode(), end="")
# HELP jobs_total Jobs done.
# TYPE jobs_total counter
jobs_total 1
"""

from __future__ import annotations

import logging
import math
import os
import re
import resource
import socket
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from agent import __version__
from agent.errors import ConfigError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                           0.1, 0.25, 0.5, 1.0)
SLEEP_DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_METRIC_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Key = tuple[str, ...]
FnValue = float | dict[Key, float]


def format_value(v: float) -> str:
    """A sample value as Prometheus writes it: ``1``, ``0.25``, ``1e-05``, ``+Inf``, ``NaN``."""
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def _escape_label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape_label_value(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


class _Metric:
    kind = ""  # the "# TYPE" word

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()):
        if not isinstance(name, str) or not _METRIC_NAME_RE.match(name):
            raise ValueError(f"Invalid metric name: {name!r} (expected [a-zA-Z_:][a-zA-Z0-9_:]*)")
        labelnames = tuple(labelnames)
        for ln in labelnames:
            if not isinstance(ln, str) or not _LABEL_NAME_RE.match(ln) or ln.startswith("__"):
                raise ValueError(f"Invalid label name {ln!r} for metric {name!r} "
                                 "(expected [a-zA-Z_][a-zA-Z0-9_]*, not starting with '__')")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"Duplicate label names for metric {name!r}: {labelnames}")
        self.name = name
        self.help = str(help)
        self.labelnames: Key = labelnames
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, object]) -> Key:
        if len(labels) == len(self.labelnames):
            try:
                return tuple(map(str, map(labels.__getitem__, self.labelnames)))
            except KeyError:
                pass
        raise ValueError(f"Metric {self.name!r} takes labels {list(self.labelnames)}, "
                         f"got {sorted(labels)}")

    def sample_names(self) -> tuple[str, ...]:
        return (self.name,)

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def render_lines(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError


class _Scalar(_Metric):
    """A value per label tuple; the unlabelled series exists (at 0) from the start."""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()):
        super().__init__(name, help, labelnames)
        self._values: dict[Key, float] = {} if self.labelnames else {(): 0.0}

    def _add(self, amount: float, labels: dict[str, object]) -> None:
        key = self._key(labels) if (labels or self.labelnames) else ()
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        key = self._key(labels) if (labels or self.labelnames) else ()
        with self._lock:
            return self._values.get(key, 0.0)

    def render_lines(self) -> list[str]:
        with self._lock:
            items = list(self._values.items())
        lines = self._header()
        lines += [f"{self.name}{_labels_text(self.labelnames, k)} {format_value(v)}"
                  for k, v in items]
        return lines


class _BoundCounter:
    """A labelled series with its key resolved once: ``c.labels(kind="frames").inc()``."""

    __slots__ = ("_metric", "_key")

    def __init__(self, metric: _Scalar, key: Key):
        self._metric, self._key = metric, key
        with metric._lock:
            metric._values.setdefault(key, 0.0)

    def inc(self, amount: float = 1.0) -> None:
        if not amount >= 0:  # also rejects NaN
            raise ValueError(f"Counter {self._metric.name!r} cannot decrease: "
                             f"inc amount must be >= 0, got {amount!r}")
        with self._metric._lock:
            self._metric._values[self._key] += amount

    def value(self) -> float:
        with self._metric._lock:
            return self._metric._values[self._key]


class _BoundGauge(_BoundCounter):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        with self._metric._lock:
            self._metric._values[self._key] += amount

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)

    def set(self, value: float) -> None:
        with self._metric._lock:
            self._metric._values[self._key] = float(value)


class Counter(_Scalar):
    """A monotone count. ``c.inc()``, ``c.inc(3, kind="frames")``, ``c.labels(kind="x").inc()``."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if not amount >= 0:  # also rejects NaN
            raise ValueError(f"Counter {self.name!r} cannot decrease: "
                             f"inc amount must be >= 0, got {amount!r}")
        key = self._key(labels) if (labels or self.labelnames) else ()
        with self._lock:  # inlined (no _add call): this is the per-frame hot path
            self._values[key] = self._values.get(key, 0.0) + amount

    def labels(self, **labels: object) -> _BoundCounter:
        return _BoundCounter(self, self._key(labels))


class Gauge(_Scalar):
    """A value that goes up and down: ``set``, ``inc``, ``dec``."""

    kind = "gauge"

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels) if (labels or self.labelnames) else ()
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1.0, **labels: object) -> None:
        self._add(-amount, labels)

    def labels(self, **labels: object) -> _BoundGauge:
        return _BoundGauge(self, self._key(labels))


class _HistogramState:
    __slots__ = ("counts", "sum", "count")

    def __init__(self, n_buckets: int):
        self.counts = [0] * n_buckets  # per bucket, not cumulative (cumulated at render)
        self.sum = 0.0
        self.count = 0


class Histogram(_Metric):
    """Observations counted into ``le`` buckets (cumulative in the output, ``+Inf`` == count)."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = (),
                 buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS):
        super().__init__(name, help, labelnames)
        if "le" in self.labelnames:
            raise ValueError(f"Histogram {name!r}: label name 'le' is reserved")
        bounds = [float(b) for b in buckets]
        if bounds and math.isinf(bounds[-1]) and bounds[-1] > 0:
            bounds.pop()
        if not bounds or any(math.isnan(b) or math.isinf(b) for b in bounds) \
                or any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"Histogram {name!r}: buckets must be finite and strictly "
                             f"increasing, got {list(buckets)!r}")
        self.buckets: tuple[float, ...] = (*bounds, math.inf)
        self._bounds = tuple(bounds)
        self._states: dict[Key, _HistogramState] = {}
        if not self.labelnames:
            self._states[()] = _HistogramState(len(self.buckets))

    def sample_names(self) -> tuple[str, ...]:
        return (self.name, f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")

    def observe(self, value: float, **labels: object) -> None:
        if math.isnan(value):
            raise ValueError(f"Histogram {self.name!r}: cannot observe NaN")
        key = self._key(labels) if (labels or self.labelnames) else ()
        i = bisect_left(self._bounds, value)  # first bucket with value <= le
        with self._lock:
            st = self._states.get(key)
            if st is None:
                st = self._states[key] = _HistogramState(len(self.buckets))
            st.counts[i] += 1
            st.sum += value
            st.count += 1

    def count(self, **labels: object) -> int:
        key = self._key(labels) if (labels or self.labelnames) else ()
        with self._lock:
            st = self._states.get(key)
            return st.count if st else 0

    def sum(self, **labels: object) -> float:
        key = self._key(labels) if (labels or self.labelnames) else ()
        with self._lock:
            st = self._states.get(key)
            return st.sum if st else 0.0

    def render_lines(self) -> list[str]:
        with self._lock:
            snap = [(k, list(st.counts), st.sum, st.count) for k, st in self._states.items()]
        lines = self._header()
        names = (*self.labelnames, "le")
        for key, counts, total, n in snap:
            cumulative = 0
            for le, c in zip(self.buckets, counts, strict=True):
                cumulative += c
                labels = _labels_text(names, (*key, format_value(le)))
                lines.append(f"{self.name}_bucket{labels} {cumulative}")
            labels = _labels_text(self.labelnames, key)
            lines.append(f"{self.name}_sum{labels} {format_value(total)}")
            lines.append(f"{self.name}_count{labels} {n}")
        return lines


class FunctionMetric(_Metric):
    """A gauge (or counter) whose value ``fn()`` computes at scrape time.

    ``fn`` returns a number when there are no labels, else ``{label_values_tuple: number}``.
    """

    def __init__(self, name: str, help: str, fn: Callable[[], FnValue],
                 labelnames: Iterable[str] = (), kind: str = "gauge"):
        super().__init__(name, help, labelnames)
        if kind not in ("gauge", "counter"):
            raise ValueError(f"Function metric {name!r}: kind {kind!r}, expected gauge|counter")
        self.kind = kind
        self._fn = fn
        self._failing = False

    def _samples(self) -> list[tuple[Key, float]]:
        out = self._fn()
        if not self.labelnames:
            return [((), float(out))]  # type: ignore[arg-type]
        if not isinstance(out, dict):
            raise TypeError(f"expected a dict of label tuples to values, got {type(out).__name__}")
        samples = []
        for key, v in out.items():
            if not isinstance(key, tuple) or len(key) != len(self.labelnames):
                raise TypeError(f"label key {key!r} does not match labels {list(self.labelnames)}")
            samples.append((tuple(str(k) for k in key), float(v)))
        return samples

    def render_lines(self) -> list[str]:
        try:
            samples = self._samples()
        except Exception:
            if not self._failing:  # log once per failing spell, not once per scrape
                log.warning("metric %s: value function failed; leaving it out", self.name,
                            exc_info=True)
            self._failing = True
            return []
        self._failing = False
        return self._header() + [f"{self.name}{_labels_text(self.labelnames, k)} {format_value(v)}"
                                 for k, v in samples]


class Registry:
    """The set of metrics one ``/metrics`` page shows, in registration order."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def _register(self, metric: _Metric) -> _Metric:
        with self._lock:
            taken = self._names.intersection(metric.sample_names())
            if taken:
                raise ValueError(f"Metric {metric.name!r} is already registered "
                                 f"(name clash on {sorted(taken)})")
            self._names.update(metric.sample_names())
            self._metrics.append(metric)
        return metric

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        return self._register(Counter(name, help, labelnames))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Gauge:
        return self._register(Gauge(name, help, labelnames))  # type: ignore[return-value]

    def histogram(self, name: str, help: str, labelnames: Iterable[str] = (),
                  buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS) -> Histogram:
        return self._register(Histogram(name, help, labelnames, buckets))  # type: ignore[return-value]

    def gauge_fn(self, name: str, help: str, fn: Callable[[], FnValue],
                 labelnames: Iterable[str] = ()) -> FunctionMetric:
        return self._register(FunctionMetric(name, help, fn, labelnames))  # type: ignore[return-value]

    def counter_fn(self, name: str, help: str, fn: Callable[[], FnValue],
                   labelnames: Iterable[str] = ()) -> FunctionMetric:
        """Like ``gauge_fn`` for a value that only grows (e.g. CPU seconds)."""
        return self._register(  # type: ignore[return-value]
            FunctionMetric(name, help, fn, labelnames, kind="counter"))

    def render(self) -> bytes:
        with self._lock:
            metrics = list(self._metrics)
        lines: list[str] = []
        for m in metrics:
            lines += m.render_lines()
        return ("\n".join(lines) + "\n").encode() if lines else b""


def parse_listen(listen: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[V6ADDR]:PORT"`` -> (host, port); ConfigError names a bad value."""
    host, sep, port_s = listen.rpartition(":") if isinstance(listen, str) else ("", "", "")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_s.isdigit() or int(port_s) > 65535:
        raise ConfigError(f"Invalid metrics listen address: {listen!r} "
                          "(expected HOST:PORT, e.g. 127.0.0.1:9464; port 0 picks a free one)")
    return host, int(port_s)


class _Handler(BaseHTTPRequestHandler):
    registry: Registry  # set on the per-server subclass
    timeout = 10  # a stalled client frees its thread instead of holding it forever

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                self._reply(200, self.registry.render(), CONTENT_TYPE)
            except Exception:
                log.exception("rendering /metrics failed")
                self._reply(500, b"metrics rendering failed\n", "text/plain; charset=utf-8")
        elif path == "/healthz":
            self._reply(200, b"ok\n", "text/plain; charset=utf-8")
        else:
            self._reply(404, b"not found\n", "text/plain; charset=utf-8")

    def _reply(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass  # quiet: a scrape every 15 s must not fill the journal


class MetricsServer:
    """Serve ``registry`` at ``http://HOST:PORT/metrics`` from a daemon thread.

    >>> srv = MetricsServer(Registry(), "127.0.0.1:0"); srv.start()
    >>> srv.address[1] > 0
    True
    >>> srv.stop()
    """

    def __init__(self, registry: Registry, listen: str):
        self.registry = registry
        self.listen = listen
        self._host, self._port = parse_listen(listen)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("MetricsServer already started")
        handler = type("MetricsHandler", (_Handler,), {"registry": self.registry})
        server_cls = type("MetricsHTTPServer", (ThreadingHTTPServer,), {
            "daemon_threads": True,
            "address_family": _family(self._host),
        })
        try:
            self._server = server_cls((self._host, self._port), handler)
        except OSError as exc:
            raise ConfigError(f"Cannot serve metrics on {self.listen!r}: {exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.5},
                                        name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("MetricsServer is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _resident_memory_bytes() -> float:
    try:
        with open("/proc/self/statm", "rb") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except OSError:  # not Linux: peak RSS is the best the stdlib offers (KiB on Linux/BSD)
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass(frozen=True)
class DaemonMetrics:
    """Every metric the agent daemon exports; the daemon just calls them."""

    messages_received: Counter
    frames: Counter
    windows: Counter
    predictions: Counter
    novelty: Counter
    dropped: Counter
    labels_learned: Counter
    labels_duplicate: Counter
    sleeps: Counter
    reconnects: Counter
    outbox_dropped: Counter
    frames_reordered: Counter
    frame_gaps: Counter
    frames_duplicate: Counter
    frame_to_prediction_seconds: Histogram
    inference_batch_seconds: Histogram
    label_ack_seconds: Histogram
    sleep_duration_seconds: Histogram
    queue_depth: Gauge
    memory_episodes: Gauge
    memory_capacity: Gauge
    classes: Gauge
    adapter_version: Gauge
    devices: Gauge
    connected: Gauge
    sleeping: Gauge
    outbox_depth: Gauge
    up: Gauge
    build_info: Gauge


MESSAGE_KINDS = ("frames", "labels", "cmd")
SLEEP_OUTCOMES = ("accepted", "rolled_back", "preempted", "error")


def daemon_metrics(registry: Registry, version: str = __version__) -> DaemonMetrics:
    """Register the agent's ``reverie_*`` metrics (and process metrics) on ``registry``."""
    r, p = registry, "reverie_"
    m = DaemonMetrics(
        messages_received=r.counter(p + "messages_received_total",
                                    "MQTT messages received, by inbound topic kind.", ["kind"]),
        frames=r.counter(p + "frames_total", "Sensor frames decoded."),
        windows=r.counter(p + "windows_total", "Windows completed and sent to inference."),
        predictions=r.counter(p + "predictions_total", "Predictions published."),
        novelty=r.counter(p + "novelty_total", "Windows flagged as novel."),
        dropped=r.counter(p + "dropped_total", "Messages dropped, by reason.", ["reason"]),
        labels_learned=r.counter(p + "labels_learned_total", "Labels learned."),
        labels_duplicate=r.counter(p + "labels_duplicate_total",
                                   "Labels ignored as already-seen redeliveries."),
        sleeps=r.counter(p + "sleeps_total", "Sleep (consolidation) runs, by outcome.",
                         ["outcome"]),
        reconnects=r.counter(p + "reconnects_total", "Reconnections to the MQTT broker."),
        outbox_dropped=r.counter(p + "outbox_dropped_total",
                                 "Outbound messages dropped because the outbox was full."),
        frames_reordered=r.counter(p + "frames_reordered_total",
                                   "Frames that arrived out of order and were reordered."),
        frame_gaps=r.counter(p + "frame_gaps_total", "Gaps detected in frame sequence numbers."),
        frames_duplicate=r.counter(p + "frames_duplicate_total", "Duplicate frames ignored."),
        frame_to_prediction_seconds=r.histogram(
            p + "frame_to_prediction_seconds",
            "Time from a window's last frame arriving to its prediction being published."),
        inference_batch_seconds=r.histogram(p + "inference_batch_seconds",
                                            "Time to run one inference batch."),
        label_ack_seconds=r.histogram(p + "label_ack_seconds",
                                      "Time from a label arriving to its acknowledgement."),
        sleep_duration_seconds=r.histogram(p + "sleep_duration_seconds",
                                           "Duration of sleep (consolidation) runs.",
                                           buckets=SLEEP_DURATION_BUCKETS),
        queue_depth=r.gauge(p + "queue_depth", "Inbound messages waiting to be processed."),
        memory_episodes=r.gauge(p + "memory_episodes", "Episodes held in episodic memory."),
        memory_capacity=r.gauge(p + "memory_capacity", "Capacity of episodic memory (episodes)."),
        classes=r.gauge(p + "classes", "Classes the agent currently knows."),
        adapter_version=r.gauge(p + "adapter_version", "Version of the active adapter."),
        devices=r.gauge(p + "devices", "Devices seen and tracked."),
        connected=r.gauge(p + "connected", "1 while connected to the MQTT broker."),
        sleeping=r.gauge(p + "sleeping", "1 while a sleep (consolidation) runs."),
        outbox_depth=r.gauge(p + "outbox_depth", "Outbound messages waiting to be published."),
        up=r.gauge(p + "up", "1 while the agent runs."),
        build_info=r.gauge(p + "build_info", "Agent version (value is always 1).", ["version"]),
    )
    # Known label values exist at 0 from the start so rate() and absent() behave.
    for kind in MESSAGE_KINDS:
        m.messages_received.labels(kind=kind)
    for outcome in SLEEP_OUTCOMES:
        m.sleeps.labels(outcome=outcome)
    m.up.set(1)
    m.build_info.set(1, version=version)
    r.gauge_fn("process_resident_memory_bytes", "Resident memory size in bytes.",
               _resident_memory_bytes)
    r.counter_fn("process_cpu_seconds_total", "Total user and system CPU time in seconds.",
                 _cpu_seconds)
    return m
