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

Modules: `registry` (metric types, Registry, formatting), `server` (parse_listen,
MetricsServer), `daemon` (DaemonMetrics, daemon_metrics). All log as ``agent.metrics``.

>>> reg = Registry()
>>> reg.counter("jobs_total", "Jobs done.").inc()
>>> print(reg.render().decode(), end="")
# HELP jobs_total Jobs done.
# TYPE jobs_total counter
jobs_total 1
"""

from agent.metrics.daemon import (
    MESSAGE_KINDS,
    SLEEP_DURATION_BUCKETS,
    SLEEP_OUTCOMES,
    DaemonMetrics,
    daemon_metrics,
)
from agent.metrics.registry import (
    CONTENT_TYPE,
    DEFAULT_LATENCY_BUCKETS,
    Counter,
    FnValue,
    FunctionMetric,
    Gauge,
    Histogram,
    Key,
    Registry,
    format_value,
)
from agent.metrics.server import MetricsServer, parse_listen

__all__ = [
    "CONTENT_TYPE", "DEFAULT_LATENCY_BUCKETS", "MESSAGE_KINDS", "SLEEP_DURATION_BUCKETS",
    "SLEEP_OUTCOMES", "Counter", "DaemonMetrics", "FnValue", "FunctionMetric", "Gauge",
    "Histogram", "Key", "MetricsServer", "Registry", "daemon_metrics", "format_value",
    "parse_listen",
]
