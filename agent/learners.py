"""The daemon's learners: one shared, or one per device (gateway ``learner = "per_device"``).

Per-device learners cost memory (~5 MB each) and two file descriptors, and each writes
its own state directory, so they are bounded (issue 13, finding 8):

* ``agent.max_learners`` (default 64) learners at most; ``agent.learner_devices``, when
  set, the only devices that get one. A device beyond either still gets predictions, from
  one read-only learner built from the bundle alone (no state, never learns); its labels
  are refused with reason ``no_learner``.
* a learner that cannot be created (e.g. its state directory cannot be written: a full
  disk) is reported with ``learner_failed`` and retried after `RETRY_S`, never on every
  frame; meanwhile the device is predicted by the read-only learner and its labels wait
  (not acknowledged); the other devices do not notice.
* a periodic checkpoint skips learners whose state did not change since their last one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from agent.errors import ReverieError

log = logging.getLogger("reverie.daemon")
RETRY_S = 30.0          # a learner that failed to open is tried again after this long


class NoLearner(ReverieError):
    """No learner may (or can) serve this device; `reason` is the event's reason code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Learners:
    """Creates, bounds and checkpoints the learners (the worker thread creates them)."""

    def __init__(self, make, *, per_device: bool, state_dir: Path | None, owner: str,
                 max_learners: int, allowed: tuple[str, ...] = (), on_new=None):
        self._make = make                  # make(state_dir | None) -> Learner
        self.per_device = per_device
        self.state_dir = state_dir
        self.owner = owner
        self.max_learners = max_learners
        self.allowed = frozenset(allowed)
        self._on_new = on_new or (lambda: None)
        self.shared = None if per_device else make(state_dir)
        self._by_device: dict[str, object] = {}
        self._readonly = None
        self._failed: dict[str, tuple[float, str]] = {}   # device -> (retry at, why)

    def for_device(self, device: str):
        """The learner that learns for `device`; raises NoLearner when there is none."""
        if self.shared is not None:
            return self.shared
        learner = self._by_device.get(device)
        if learner is not None:
            return learner
        if self.allowed and device not in self.allowed:
            raise NoLearner("no_learner", f"device {device} is not in agent.learner_devices: "
                            "predictions come from the bundle, labels are not learned")
        if len(self._by_device) >= self.max_learners:
            raise NoLearner("no_learner", f"agent.max_learners={self.max_learners} learners "
                            f"exist: device {device} gets predictions from the bundle, its "
                            "labels are not learned")
        retry_at, why = self._failed.get(device, (0.0, ""))
        if time.monotonic() < retry_at:
            raise NoLearner("learner_failed", why)
        state = (self.state_dir / "devices" / device) if self.state_dir else None
        try:
            learner = self._make(state)
        except (ReverieError, OSError) as exc:
            why = f"cannot open the learner of device {device} ({exc}); retrying in {RETRY_S:.0f} s"
            self._failed[device] = (time.monotonic() + RETRY_S, why)
            log.error("%s", why)
            raise NoLearner("learner_failed", why) from exc
        self._failed.pop(device, None)
        self._by_device[device] = learner
        self._on_new()
        return learner

    def for_prediction(self, device: str):
        """``(learner, problem)``: the learner that predicts for `device` -- its own, else
        the read-only one built from the bundle -- and the NoLearner that says why it is
        not its own (None when it is), for the caller to report."""
        try:
            return self.for_device(device), None
        except NoLearner as exc:
            if self._readonly is None:
                self._readonly = self._make(None)
            return self._readonly, exc

    def items(self) -> list[tuple[str, object]]:
        if self.shared is not None:
            return [(self.owner, self.shared)]
        return list(self._by_device.items())

    def checkpoint(self, *, changed_only: bool = False) -> dict[str, int | None]:
        """Checkpoint every learner (``changed_only``: those whose state changed);
        returns ``{device: checkpoint number or None}``. Raises the first failure after
        trying them all."""
        out: dict[str, int | None] = {}
        first: Exception | None = None
        for device, learner in self.items():
            state = learner.state
            if changed_only and (state is None or not state.changed):
                continue
            try:
                out[device] = learner.checkpoint()
            except (ReverieError, OSError) as exc:
                log.error("checkpoint of %s failed: %s", device, exc)
                first = first or exc
        if first is not None:
            raise first
        return out

    def close(self) -> None:
        for _device, learner in self.items():
            learner.close()
