"""agent.metrics: the Prometheus text format, thread safety, and the HTTP endpoint."""

from __future__ import annotations

import logging
import math
import sys
import threading
import urllib.error
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError
from agent.metrics import (
    CONTENT_TYPE,
    DEFAULT_LATENCY_BUCKETS,
    MetricsServer,
    Registry,
    daemon_metrics,
    format_value,
    parse_listen,
)

# --- a tiny independent parser of the text format (the oracle for round trips) ---------


def _parse_labels(s: str, i: int) -> tuple[dict[str, str], int]:
    """Parse ``{a="x",b="y"}`` starting at s[i] == "{"; return (labels, index after "}")."""
    assert s[i] == "{"
    i += 1
    labels: dict[str, str] = {}
    while s[i] != "}":
        eq = s.index("=", i)
        name = s[i:eq]
        assert s[eq + 1] == '"', s
        i, value = eq + 2, []
        while s[i] != '"':
            if s[i] == "\\":
                value.append({"\\": "\\", '"': '"', "n": "\n"}[s[i + 1]])
                i += 2
            else:
                value.append(s[i])
                i += 1
        assert name not in labels
        labels[name] = "".join(value)
        i += 1
        if s[i] == ",":
            i += 1
    return labels, i + 1


def parse_exposition(text: str) -> tuple[dict[str, dict[str, str]], list[tuple[str, dict, float]]]:
    """-> ({family: {"help": .., "type": ..}}, [(sample_name, labels, value), ...])."""
    assert text == "" or text.endswith("\n")
    families: dict[str, dict[str, str]] = {}
    samples: list[tuple[str, dict, float]] = []
    current = None
    for line in text.split("\n")[:-1]:  # only \n ends a line (label values may hold \x85, \r)
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            assert name not in families, f"family {name} twice"
            families[name] = {"help": help_.replace("\\n", "\n").replace("\\\\", "\\")}
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current and kind in ("counter", "gauge", "histogram"), line
            families[name]["type"] = kind
        else:
            end = next((k for k, ch in enumerate(line) if ch in "{ "), len(line))
            name = line[:end]
            labels, end = _parse_labels(line, end) if line[end] == "{" else ({}, end)
            assert line[end] == " ", line
            assert current and name in (current, f"{current}_bucket", f"{current}_sum",
                                        f"{current}_count"), f"{name} outside its family"
            samples.append((name, labels, float(line[end + 1:])))
    return families, samples


def _scrape(reg: Registry) -> dict[tuple[str, tuple], float]:
    _, samples = parse_exposition(reg.render().decode())
    return {(n, tuple(sorted(lab.items()))): v for n, lab, v in samples}


# --- rendering -------------------------------------------------------------------------

GOLDEN = """\
# HELP app_requests_total Requests handled.
# TYPE app_requests_total counter
app_requests_total{code="200",method="GET"} 1
app_requests_total{code="500",method="POST"} 2.5
# HELP app_temperature_celsius Temperature.\\nSecond line \\\\ backslash "quoted"
# TYPE app_temperature_celsius gauge
app_temperature_celsius -3.5
# HELP app_latency_seconds Latency.
# TYPE app_latency_seconds histogram
app_latency_seconds_bucket{le="0.125"} 1
app_latency_seconds_bucket{le="1"} 2
app_latency_seconds_bucket{le="+Inf"} 3
app_latency_seconds_sum 3.375
app_latency_seconds_count 3
# HELP app_queue Queue depth.
# TYPE app_queue gauge
app_queue 7
# HELP app_pending Pending, by device.
# TYPE app_pending gauge
app_pending{device="d1"} 1e-05
app_pending{device="d2"} +Inf
"""


def test_render_golden():
    reg = Registry()
    c = reg.counter("app_requests_total", "Requests handled.", ["code", "method"])
    c.inc(code="200", method="GET")
    c.labels(code=500, method="POST").inc(2.5)  # label values are str()-ed
    g = reg.gauge("app_temperature_celsius", 'Temperature.\nSecond line \\ backslash "quoted"')
    g.set(-3.5)
    h = reg.histogram("app_latency_seconds", "Latency.", buckets=(0.125, 1.0))
    for v in (0.25 / 2, 0.25, 3.0):
        h.observe(v)
    reg.gauge_fn("app_queue", "Queue depth.", lambda: 7)
    reg.gauge_fn("app_pending", "Pending, by device.",
                 lambda: {("d1",): 1e-5, ("d2",): math.inf}, labelnames=["device"])
    assert reg.render().decode() == GOLDEN
    assert h.buckets == (0.125, 1.0, math.inf)


def test_empty_registry_and_unused_labelled_metric():
    reg = Registry()
    assert reg.render() == b""
    reg.counter("x_total", "X.", ["kind"])
    reg.gauge("y", "Y.")
    assert reg.render().decode() == ("# HELP x_total X.\n# TYPE x_total counter\n"
                                     "# HELP y Y.\n# TYPE y gauge\ny 0\n")


def test_label_values_are_escaped():
    reg = Registry()
    c = reg.counter("esc_total", "Escaping.", ["v"])
    nasty = 'back\\slash "quote"\nnewline } , ='
    c.inc(v=nasty)
    line = reg.render().decode().splitlines()[-1]
    assert line == 'esc_total{v="back\\\\slash \\"quote\\"\\nnewline } , ="} 1'
    assert _scrape(reg) == {("esc_total", (("v", nasty),)): 1.0}


@pytest.mark.parametrize("v, text", [(0, "0"), (3.0, "3"), (-2, "-2"), (0.5, "0.5"),
                                     (1e-5, "1e-05"), (1e20, "1e+20"), (math.inf, "+Inf"),
                                     (-math.inf, "-Inf"), (math.nan, "NaN")])
def test_format_value(v, text):
    assert format_value(v) == text


@given(st.floats(allow_nan=False))
def test_format_value_round_trips(v):
    assert float(format_value(v)) == v


def test_histogram_buckets_are_cumulative_and_inf_is_count():
    reg = Registry()
    h = reg.histogram("lat_seconds", "Latency.")
    values = [0.00005, 0.0001, 0.0001001, 0.003, 0.003, 0.7, 1.0, 5.0, -1.0]
    for v in values:
        h.observe(v)
    s = _scrape(reg)
    counts = [s[("lat_seconds_bucket", (("le", format_value(b)),))]
              for b in (*DEFAULT_LATENCY_BUCKETS, math.inf)]
    assert counts == sorted(counts)  # cumulative
    assert counts[-1] == len(values) == h.count() == s[("lat_seconds_count", ())]
    # le is inclusive: 0.0001 lands in the 0.0001 bucket, 1.0 in the 1.0 bucket
    assert s[("lat_seconds_bucket", (("le", "0.0001"),))] == 3  # -1, 0.00005, 0.0001
    assert s[("lat_seconds_bucket", (("le", "1"),))] == 8
    assert s[("lat_seconds_sum", ())] == pytest.approx(sum(values))
    assert h.sum() == pytest.approx(sum(values))


def test_counter_is_monotone():
    reg = Registry()
    c = reg.counter("mono_total", "Monotone.", ["k"])
    seen = []
    for amount in (1, 0, 2.5, 1e-9):
        c.inc(amount, k="a")
        seen.append(c.value(k="a"))
    assert seen == sorted(seen) and seen[-1] == pytest.approx(3.5)
    for bad in (-1, -1e-12, math.nan):
        with pytest.raises(ValueError, match="mono_total.*cannot decrease"):
            c.inc(bad, k="a")
        with pytest.raises(ValueError, match="mono_total.*cannot decrease"):
            c.labels(k="a").inc(bad)
    assert c.value(k="a") == seen[-1]
    assert c.value(k="never") == 0.0
    assert not hasattr(c, "set") and not hasattr(c.labels(k="a"), "dec")


def test_gauge_set_inc_dec_and_bound_labels():
    reg = Registry()
    g = reg.gauge("depth", "Depth.")
    g.set(5)
    g.inc()
    g.dec(2.5)
    assert g.value() == 3.5
    lg = reg.gauge("per_dev", "Per device.", ["device"])
    b = lg.labels(device="d1")
    b.set(2)
    b.inc(3)
    b.dec()
    lg.set(9, device="d2")
    assert (b.value(), lg.value(device="d2")) == (4.0, 9.0)


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "é", "a.b"])
def test_bad_metric_name_is_named(name):
    with pytest.raises(ValueError, match="Invalid metric name") as e:
        Registry().counter(name, "x")
    assert repr(name) in str(e.value)


@pytest.mark.parametrize("label", ["", "1a", "a:b", "a-b", "__reserved"])
def test_bad_label_name_is_named(label):
    with pytest.raises(ValueError, match="Invalid label name") as e:
        Registry().gauge("ok_name:x", "x", [label])
    assert repr(label) in str(e.value)


def test_duplicate_and_clashing_registration():
    reg = Registry()
    reg.counter("dup_total", "x")
    with pytest.raises(ValueError, match="'dup_total' is already registered"):
        reg.gauge("dup_total", "y")
    reg.histogram("h_seconds", "h")
    with pytest.raises(ValueError, match="h_seconds_count"):
        reg.counter("h_seconds_count", "clashes with the histogram's _count series")
    with pytest.raises(ValueError, match="already registered"):
        reg.gauge_fn("h_seconds", "x", lambda: 1)


def test_histogram_validation():
    reg = Registry()
    with pytest.raises(ValueError, match="'le' is reserved"):
        reg.histogram("h1", "h", ["le"])
    for bad in ([], [1.0, 1.0], [2.0, 1.0], [math.nan], [-math.inf, 1.0]):
        with pytest.raises(ValueError, match="strictly increasing"):
            reg.histogram("h2", "h", buckets=bad)
    h = reg.histogram("h3", "h", buckets=[1.0, math.inf])  # explicit +Inf is accepted
    assert h.buckets == (1.0, math.inf)
    with pytest.raises(ValueError, match="NaN"):
        h.observe(math.nan)


def test_wrong_labels_name_what_was_expected():
    reg = Registry()
    c = reg.counter("lab_total", "x", ["kind"])
    plain = reg.counter("plain_total", "x")
    h = reg.histogram("lab_seconds", "x", ["kind"])
    for call in (lambda: c.inc(), lambda: c.inc(kynd="a"), lambda: c.inc(kind="a", extra=1),
                 lambda: plain.inc(kind="a"), lambda: h.observe(0.1),
                 lambda: c.labels(other="x")):
        with pytest.raises(ValueError, match=r"takes labels \['kind'\]|takes labels \[\]"):
            call()


# --- gauge_fn ----------------------------------------------------------------------------


def test_failing_gauge_fn_is_skipped_and_logged_once(caplog):
    reg = Registry()
    reg.counter("before_total", "x").inc()
    state = {"fail": True}

    def flaky() -> float:
        if state["fail"]:
            raise RuntimeError("sensor gone")
        return 2.0

    reg.gauge_fn("flaky", "Flaky.", flaky)
    reg.gauge_fn("malformed", "Returns the wrong shape.", lambda: {"not-a-tuple": 1},
                 labelnames=["a"])
    reg.gauge("after", "x").set(3)
    with caplog.at_level(logging.WARNING, logger="agent.metrics"):
        for _ in range(3):
            fams, samples = parse_exposition(reg.render().decode())
            assert "flaky" not in fams and "malformed" not in fams
            assert {n for n, _, _ in samples} == {"before_total", "after"}
    flaky_logs = [r for r in caplog.records if "flaky" in r.getMessage()]
    assert len(flaky_logs) == 1 and "sensor gone" in caplog.text
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) == 1
    state["fail"] = False
    assert _scrape(reg)[("flaky", ())] == 2.0


# --- property tests: rendering round-trips -------------------------------------------------

_label_values = st.sampled_from(["a", 'q"uote', "back\\slash", "new\nline", "ü", ""]) | st.text(
    max_size=6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_label_values,
                          st.floats(min_value=-10, max_value=10, allow_nan=False)), max_size=40))
def test_histogram_render_parses_back_to_same_counts(observations):
    buckets = (0.001, 0.01, 0.5, 2.0)
    reg = Registry()
    h = reg.histogram("prop_seconds", "Property.", ["dev"], buckets=buckets)
    oracle: dict[str, list[float]] = {}
    for dev, v in observations:
        h.observe(v, dev=dev)
        oracle.setdefault(dev, []).append(v)
    s = _scrape(reg)
    assert len(s) == len(oracle) * (len(buckets) + 3)
    for dev, vs in oracle.items():
        total = 0.0
        for v in vs:
            total += v  # same order as the histogram: the sums match exactly
        assert s[("prop_seconds_count", (("dev", dev),))] == len(vs) == h.count(dev=dev)
        assert s[("prop_seconds_sum", (("dev", dev),))] == total
        for le in (*buckets, math.inf):
            key = ("prop_seconds_bucket", (("dev", dev), ("le", format_value(le))))
            assert s[key] == sum(1 for v in vs if v <= le)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_label_values, _label_values,
                          st.floats(min_value=0, max_value=1e6, allow_nan=False)), max_size=40))
def test_counter_render_parses_back_to_same_totals(incs):
    reg = Registry()
    c = reg.counter("prop_total", "Property.", ["a", "b"])
    oracle: dict[tuple[str, str], float] = {}
    for a, b, amount in incs:
        c.inc(amount, a=a, b=b)
        oracle[(a, b)] = oracle.get((a, b), 0.0) + amount
    assert _scrape(reg) == {("prop_total", (("a", a), ("b", b))): v
                            for (a, b), v in oracle.items()}


# --- threads ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_switch_interval():
    # Force frequent GIL hand-offs so an unlocked read-modify-write would lose updates.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_concurrent_increments_are_exact(tiny_switch_interval):
    reg = Registry()
    plain = reg.counter("t_total", "x")
    labelled = reg.counter("t_kind_total", "x", ["kind"])
    bound = labelled.labels(kind="bound")
    gauge = reg.gauge("t_gauge", "x")
    hist = reg.histogram("t_seconds", "x")
    n_threads, n = 8, 5000
    start = threading.Barrier(n_threads)

    def work(i: int) -> None:
        start.wait()
        for _ in range(n):
            plain.inc()
            labelled.inc(kind=f"k{i % 2}")
            bound.inc(2)
            gauge.inc()
            gauge.dec(0.5)
            hist.observe(0.003)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = n_threads * n
    assert plain.value() == total
    assert labelled.value(kind="k0") == labelled.value(kind="k1") == total / 2
    assert bound.value() == 2 * total
    assert gauge.value() == total / 2
    assert hist.count() == total
    assert _scrape(reg)[("t_seconds_bucket", (("le", "0.005"),))] == total


# --- HTTP endpoint ---------------------------------------------------------------------------


@pytest.fixture
def server():
    reg = Registry()
    reg.counter("srv_requests_total", "x").inc(4)
    reg.gauge_fn("srv_broken", "Always raises.", lambda: 1 / 0)
    srv = MetricsServer(reg, "127.0.0.1:0")
    srv.start()
    yield srv
    srv.stop()


def _get(srv: MetricsServer, path: str):
    host, port = srv.address
    return urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10)


def test_server_serves_metrics_and_health(server, capsys):
    assert server.address[1] != 0
    with _get(server, "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == CONTENT_TYPE
        fams, samples = parse_exposition(r.read().decode())
    assert samples == [("srv_requests_total", {}, 4.0)]  # the broken gauge_fn is skipped
    with _get(server, "/healthz") as r:
        assert (r.status, r.read()) == (200, b"ok\n")
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(server, "/nope")
    assert e.value.code == 404
    assert capsys.readouterr().err == ""  # no per-request access log


def test_server_start_stop_and_errors():
    reg = Registry()
    srv = MetricsServer(reg, "127.0.0.1:0")
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.address
    srv.start()
    with pytest.raises(RuntimeError, match="already started"):
        srv.start()
    port = srv.address[1]
    taken = MetricsServer(reg, f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
        taken.start()
    srv.stop()
    srv.stop()  # idempotent
    again = MetricsServer(reg, f"127.0.0.1:{port}")  # stop() released the port
    again.start()
    again.stop()


@pytest.mark.parametrize("listen", ["", "9100", "host:", ":9100", "host:port", "h:70000", None])
def test_bad_listen_address_is_named(listen):
    with pytest.raises(ConfigError, match="Invalid metrics listen address"):
        parse_listen(listen)  # type: ignore[arg-type]


def test_parse_listen_forms():
    assert parse_listen("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("localhost:80") == ("localhost", 80)


# --- the daemon's metric set -------------------------------------------------------------------

DAEMON_FAMILIES = {
    "counter": {
        "reverie_messages_received_total", "reverie_frames_total", "reverie_windows_total",
        "reverie_predictions_total", "reverie_novelty_total", "reverie_dropped_total",
        "reverie_labels_learned_total", "reverie_labels_duplicate_total", "reverie_sleeps_total",
        "reverie_reconnects_total", "reverie_outbox_dropped_total",
        "reverie_frames_reordered_total", "reverie_frame_gaps_total",
        "reverie_frames_duplicate_total", "process_cpu_seconds_total"},
    "histogram": {
        "reverie_frame_to_prediction_seconds", "reverie_inference_batch_seconds",
        "reverie_label_ack_seconds", "reverie_sleep_duration_seconds"},
    "gauge": {
        "reverie_queue_depth", "reverie_memory_episodes", "reverie_memory_capacity",
        "reverie_classes", "reverie_adapter_version", "reverie_devices", "reverie_connected",
        "reverie_sleeping", "reverie_outbox_depth", "reverie_up", "reverie_build_info",
        "process_resident_memory_bytes"},
}


def test_daemon_metrics_registers_the_documented_set():
    reg = Registry()
    m = daemon_metrics(reg, version="9.9.9")
    m.messages_received.labels(kind="frames").inc()
    m.dropped.inc(reason="bad_json")
    m.sleeps.inc(outcome="accepted")
    m.sleep_duration_seconds.observe(420.0)
    fams, _ = parse_exposition(reg.render().decode())
    by_type = {k: {n for n, f in fams.items() if f["type"] == k} for k in DAEMON_FAMILIES}
    assert by_type == DAEMON_FAMILIES
    s = _scrape(reg)
    assert s[("reverie_up", ())] == 1
    assert s[("reverie_build_info", (("version", "9.9.9"),))] == 1
    assert s[("reverie_messages_received_total", (("kind", "frames"),))] == 1
    assert s[("reverie_messages_received_total", (("kind", "cmd"),))] == 0  # pre-created
    assert s[("reverie_sleeps_total", (("outcome", "preempted"),))] == 0
    assert s[("reverie_dropped_total", (("reason", "bad_json"),))] == 1
    assert s[("reverie_sleep_duration_seconds_bucket", (("le", "600"),))] == 1
    assert s[("reverie_sleep_duration_seconds_bucket", (("le", "300"),))] == 0
    assert s[("process_resident_memory_bytes", ())] > 1e6
    assert s[("process_cpu_seconds_total", ())] > 0
    with pytest.raises(ValueError, match="already registered"):
        daemon_metrics(reg)
