"""The agent daemon's metrics: every ``reverie_*`` series plus the process metrics."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

from agent import __version__
from agent.metrics.registry import Counter, Gauge, Histogram, Registry
from agent.topics import INBOUND

SLEEP_DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


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


MESSAGE_KINDS = INBOUND          # the inbound topic kinds: frames, labels, cmd
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
