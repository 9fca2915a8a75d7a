"""Metric types and the Registry: counters, gauges, histograms, scrape-time functions,
rendered in the Prometheus text format 0.0.4 (see the package docstring for the design)."""

from __future__ import annotations

import logging
import math
import re
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

# The package name, not __name__: log records keep the name they had before the split.
log = logging.getLogger("agent.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                           0.1, 0.25, 0.5, 1.0)

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
