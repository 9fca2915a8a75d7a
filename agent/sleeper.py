"""The sleep runner: consolidation on its own thread, off the ingest path.

The worker asks the scheduler (agent/scheduler.py) each loop; on "start" it calls
`Sleeper.start`, on "stop" `Sleeper.preempt`. The runner consolidates each learner that
learned enough since its last sleep (one, or one per device), with the stop flag the
learner honours within ~100 ms, and publishes each report as an event. Predictions go on
meanwhile: a sleep trains a copy of the head and swaps it in at the end.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("reverie.sleeper")


class Sleeper:
    def __init__(self, daemon):
        self.d = daemon
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done_at: dict[int, int] = {}     # id(learner) -> n_stored at its last sleep

    @property
    def sleeping(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def new_episodes(self) -> int:
        """Episodes learned since the last sleep, summed over learners."""
        return sum(max(0, L.n_stored - self._done_at.get(id(L), 0))
                   for _dev, L in self.d.learners())

    def start(self, reason: str, budget_s: float) -> bool:
        if self.sleeping:
            return False
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(reason, budget_s),
                                        name="reverie-sleep", daemon=True)
        self.d.metrics.sleeping.set(1)
        self._thread.start()
        return True

    def preempt(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        t = self._thread
        if t is not None:
            t.join(timeout)

    def _run(self, reason: str, budget_s: float) -> None:
        d, m = self.d, self.d.metrics
        cfg = d.config.sleep
        deadline = time.monotonic() + min(budget_s, cfg.max_duration_s)
        log.info("sleep starts (%s), budget %.1f s", reason, budget_s)
        d.publish_event(d.config.status_owner, type="sleep", reason="started",
                        detail=f"sleep started ({reason}), budget {budget_s:g} s",
                        trigger=reason)
        try:
            for device, learner in d.learners():
                left = deadline - time.monotonic()
                if self._stop.is_set() or left <= 0.05:
                    break
                base = learner.n_stored
                if base - self._done_at.get(id(learner), 0) < max(1, cfg.min_new_episodes) \
                        and reason != "command":
                    continue
                try:
                    report = learner.sleep(budget_s=left, stop_event=self._stop)
                except Exception as exc:  # noqa: BLE001 - a failed sleep must not kill the agent
                    log.exception("sleep failed for %s", device)
                    m.sleeps.inc(outcome="error")
                    d.publish_event(device, type="sleep", reason="error", detail=str(exc))
                    continue
                outcome = ("preempted" if report.preempted else
                           "accepted" if report.accepted else "rolled_back")
                m.sleeps.inc(outcome=outcome)
                m.sleep_duration_seconds.observe(report.duration_s)
                if not report.preempted:
                    self._done_at[id(learner)] = base
                body = report.to_dict()
                d.publish_event(device, type="sleep", reason=outcome, detail=report.reason,
                                report=body)
                if report.accepted:
                    d.status_changed()
        finally:
            m.sleeping.set(0)         # the worker's next scheduler poll sees the end
            log.info("sleep ends")

