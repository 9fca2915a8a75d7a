"""Broker faults of ``reverie bench chaos``: mosquitto killed and started again mid-stream.

For each outage (signal, seconds down): labels are learned; the daemon is frozen
(SIGSTOP) while a batch of QoS 1 labels is published, so the broker holds them: up to
the daemon's Receive Maximum (64) in flight in its socket, the rest queued in its
session; mosquitto is killed; the daemon is thawed (SIGCONT: it reads what its socket
holds, learns it, but cannot acknowledge it on a dead connection); after the outage
mosquitto starts again on the same port with its persistence file. Reconnect time =
mosquitto accepting connections again -> the daemon's ``reverie_connected`` gauge back at
1 (its /metrics polled every 20 ms). At the end every label the broker acknowledged to
the publisher is looked for in the daemon's state (`chaos_rig.audit`).

What survives depends on the broker: after SIGTERM mosquitto writes its persistence
file, so queued labels and the daemon's session survive; after SIGKILL everything since
its last autosave (``autosave_interval``, 1800 s by default) is gone, so labels it had
only queued are lost at the broker (not by the agent: they never reached it) and are
reported apart as ``lost_at_broker``. Labels published while the broker is down are the
publisher's to retry (it got no PUBACK); none are published then.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

from agent.bench.chaos_rig import Broker, Harness, WalArchive, audit, daemon_env, start_daemon

FROZEN_BATCH = 100          # > Receive Maximum (64): some stay queued at the broker
POLL_S = 0.02
RECONNECTS = "reverie_reconnects_total"
_SESSION = re.compile(r"connected \(session present: (\w+)\)")


def broker_campaign(bundle: Path, broker: Broker, workdir: Path, *, window: int,
                    channels: int, seed: int, outages: list[tuple[str, float]]) -> dict:
    device = "chaos-broker"
    state = workdir / "broker-state"
    env = daemon_env(state, checkpoint_interval_s=5, broker_client_id="chaos-broker")
    archive = WalArchive(state / "wal", workdir / "broker-wal-archive").start()
    h = Harness(broker.url, device, window, channels, seed)
    daemon, _took = start_daemon(bundle, broker.url, device, workdir, env)
    rows = []
    frozen: dict[str, str] = {}           # label id -> signal of the outage it met
    n = 0

    def labels(k: int) -> list[str]:
        nonlocal n
        out = [f"K{n + i:05d}" for i in range(k)]
        for i, lid in enumerate(out):
            h.label(lid, ("tap", "swipe")[(n + i) % 2])
        n += k
        return out

    try:
        for sig_name, down_s in outages:
            warm = labels(10)
            h.wait(lambda w=warm: all(i in h.label_events for i in w), 30)
            reconnects0 = _metric(daemon, RECONNECTS)
            daemon.proc.send_signal(signal.SIGSTOP)
            batch = labels(FROZEN_BATCH)
            h.wait(lambda b=batch: set(b) <= set(h.accepted()), 10)
            broker.kill(signal.SIGKILL if sig_name == "kill" else signal.SIGTERM)
            t_kill = time.monotonic()
            daemon.proc.send_signal(signal.SIGCONT)
            for lid in batch:
                frozen[lid] = sig_name
            time.sleep(max(0.0, t_kill + down_s - time.monotonic()))
            t_back = broker.start_again()
            t_conn = _wait_reconnected(daemon, reconnects0, t_back, 60.0)
            h.connected.wait(30)
            after = labels(10)
            learned = h.wait(lambda a=after: all(i in h.label_events for i in a), 30)
            log = daemon.stderr_path.read_text(errors="replace")
            sessions = _SESSION.findall(log)
            rows.append({"signal": sig_name, "down_s": down_s,
                         "reconnect_s": None if t_conn is None else t_conn - t_back,
                         "reconnects": _metric(daemon, RECONNECTS) - reconnects0,
                         "session_present": sessions[-1] if sessions else None,
                         "labels_after_learned": learned})
        sentinel = labels(1)
        h.wait(lambda: sentinel[0] in h.label_events, 60)
        daemon.close()
        accepted = h.accepted()
        verdict = audit(bundle, state, archive, [f"{device}/{i}" for i in accepted])
    finally:
        daemon.close()
        h.close()
        archive.stop()
    missing = {k.split("/", 1)[1] for k in verdict["missing"]}
    at_broker = {s: sum(1 for i, sg in frozen.items() if sg == s and i in missing)
                 for s in {s for s, _d in outages}}
    return {"outages": rows, "labels_accepted": len(accepted),
            "labels_lost": len(missing), "lost_at_broker": at_broker,
            "lost_elsewhere": sorted(i for i in missing if i not in frozen)[:20],
            "labels_duplicated": len(verdict["duplicated"]), "audit": verdict}


def _metric(daemon, name: str) -> float:
    return daemon.scrape().get(name, 0.0)


def _wait_reconnected(daemon, reconnects0: float, t_back: float,
                      timeout_s: float) -> float | None:
    """The first time after `t_back` the daemon's /metrics shows a new connection (the
    reconnect counter moved and the connected gauge is 1: a stale gauge cannot pass)."""
    deadline = t_back + timeout_s
    while time.monotonic() < deadline:
        try:
            m = daemon.scrape()
            if m.get(RECONNECTS, 0.0) > reconnects0 and m.get("reverie_connected") == 1:
                return time.monotonic()
        except OSError:
            pass
        time.sleep(POLL_S)
    return None
