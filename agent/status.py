"""What the daemon tells the world about itself: the retained status body, counters,
Prometheus gauges and the health file `reverie health` reads (a mixin of `Daemon`)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from agent import __version__
from agent.protocol import encode_status


class StatusMixin:
    """Needs the Daemon's metrics, windows, learners(), sleeper, config, bundle, outbox."""

    def counters(self) -> dict:
        m = self.metrics
        totals = self.windows.totals()
        return {"frames": int(m.frames.value()), "windows": int(m.windows.value()),
                "predictions": int(m.predictions.value()), "novelty": int(m.novelty.value()),
                "labels_learned": int(m.labels_learned.value()),
                "labels_duplicate": int(m.labels_duplicate.value()),
                "dropped": {k: int(v) for k, v in _by_label(m.dropped, "reason").items()},
                "sequence": totals, "outbox_dropped": int(m.outbox_dropped.value())}

    def status_body(self, state: str) -> dict:
        learners = self.learners()
        body = {"state": state, "agent": self.config.status_owner, "version": __version__,
                "model": self.bundle.bundle_id, "ts": time.time(),
                "uptime_s": round(time.time() - self.started_at, 1),
                "devices": len(self.windows.buffers), "sleeping": self.sleeper.sleeping,
                "counters": self.counters()}
        if learners:
            first = learners[0][1]
            body.update(classes=list(first.classes),
                        adapter_version=first.adapted_head.version,
                        memory={"episodes": sum(len(L.memory) for _d, L in learners),
                                "capacity": first.config.capacity, "learners": len(learners)})
        else:
            body.update(classes=list(self.bundle.classes), adapter_version=None)
        return body

    def status_body_bytes(self, state: str) -> bytes:
        return encode_status(**self.status_body(state))

    def _update_gauges(self) -> None:
        m, learners = self.metrics, self.learners()
        m.memory_episodes.set(sum(len(L.memory) for _d, L in learners))
        m.classes.set(max((len(L.classes) for _d, L in learners),
                          default=len(self.bundle.classes)))
        m.adapter_version.set(max((L.adapted_head.version for _d, L in learners), default=0))
        m.devices.set(len(self.windows.buffers))
        m.outbox_depth.set(len(self.outbox))

    def _write_health(self, force: bool = False, state: str = "running") -> None:
        path = self.config.health_file
        now = time.time()
        if path is None or (not force and now - self._last_health < self.config.health_interval_s):
            return
        self._last_health = now
        stalled = time.monotonic() - self.worker.last_beat > 10.0
        body = {"ts": now, "pid": os.getpid(), "state": "stalled" if stalled and
                state == "running" else state, "connected": self._connected.is_set(),
                "sleeping": self.sleeper.sleeping, "counters": self.counters()}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".health-")
        with os.fdopen(fd, "w") as f:
            json.dump(body, f)
        os.replace(tmp, path)


def _by_label(counter, name: str) -> dict[str, float]:
    """Every labelled value of a metrics Counter: {label value: count}."""
    with counter._lock:
        items = list(counter._values.items())
    return {str(k[0]): v for k, v in items if k}


def check_health(path: Path, max_age_s: float) -> tuple[bool, str]:
    """Read the daemon's health file: healthy when fresh, running and connected."""
    try:
        body = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return False, f"cannot read health file {path}: {exc}"
    age = time.time() - float(body.get("ts", 0))
    if body.get("state") != "running":
        return False, f"daemon state is {body.get('state')!r}"
    if age > max_age_s:
        return False, f"health file is {age:.0f} s old (max {max_age_s:.0f} s): daemon stalled"
    if not body.get("connected"):
        return False, "daemon is not connected to the broker"
    return True, f"ok ({age:.1f} s ago, counters {body.get('counters')})"
