"""``reverie bench fuzz``: malformed MQTT payloads through a real broker into a real daemon.

One private mosquitto and one ``reverie run`` in gateway mode (``--device-id +``, a state
directory, a split bundle so the learner runs), started like ``bench e2e`` does
(agent/bench/e2e/procs.py). A paho publisher sends ``--payloads`` messages drawn by
agent/bench/fuzz_payloads.py from ``--seed``: malformed frames, labels and commands to many
devices and bad topics, at QoS 0 and 1, with valid frames and labels mixed in; halfway
through, a valid ``sleep`` command, so the adapters are trained while the fuzzing goes on.

Pacing: the publisher keeps at most ``WINDOW`` messages ahead of what the daemon has
received (its ``/metrics``), so neither the broker nor the daemon's frame queue drops;
a ``queue_full`` or outbox drop would show in the table, apart from the malformed count.

Besides malformed bytes, the generators send *semantic* hostile inputs: huge finite
values, extreme and non-monotonic timestamps, emoji and 128-character label ids, class
floods and window-id floods (agent/bench/fuzz_payloads.py).

Pass criteria (exit 1 otherwise): the daemon is the same process at the end (never
restarted, never reconnected); its ``reverie_dropped_total{reason}`` equals, reason by
reason, what the generators expect (each computed with the same decoders); every valid
frame got its prediction and every valid label was learned; then it is killed (SIGKILL)
and ``reverie run`` comes back on its state directory, and SIGTERM stops it with exit 0;
the state then loads into a `Learner` whose memory latents and adapter arrays are all
finite and which holds the key of every valid label (each was acknowledged).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from agent.bench.cli import environment, print_table, write_json
from agent.errors import ConfigError, ReverieError

PREFIX = "reverie/fuzz"
WINDOW = 400                 # messages the publisher may be ahead of the daemon's receipts
SETTLE_TIMEOUT_S = 120.0
LABEL_WAIT_S = 1.0           # the daemon's ingest.label_wait_s: labels of absent windows


def register(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("fuzz", help="malformed MQTT payloads into a real daemon through "
                             "a private mosquitto: zero crashes, every rejection counted",
                             description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--payloads", type=int, default=100_000, help="messages to publish "
                   "(default 100000; about 4%% of them valid)")
    p.add_argument("--seed", type=int, default=0, help="seed of the payload generators")
    p.add_argument("--bundle", default=None, help="a split bundle (default: the demo's, "
                   "trained once through `export` and cached)")
    p.add_argument("--cache-dir", default=os.environ.get("REVERIE_DEMO_CACHE", ".reverie/demo"),
                   help="where the demo bundle is cached (default .reverie/demo)")
    p.add_argument("--json", default=None, help="write the results here")
    p.set_defaults(func=cmd_fuzz)


def cmd_fuzz(args: argparse.Namespace) -> int:
    from agent.bench.e2e import procs

    if args.payloads < 1:
        raise ConfigError(f"--payloads {args.payloads}: expected an integer >= 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # unwind: stop our children
    bundle = Path(args.bundle) if args.bundle else procs.demo_bundle(Path(args.cache_dir))
    result = run_campaign(bundle, args.payloads, seed=args.seed)
    _print(result)
    write_json(args.json, result)
    return 0 if result["passed"] else 1


def run_campaign(bundle_dir: Path, n_payloads: int, *, seed: int = 0,
                 workdir: Path | None = None) -> dict:
    """Run one campaign (see the module docstring); the result dict has ``passed``."""
    from agent.bench.e2e import procs
    from agent.bench.fuzz_payloads import Campaign, Spec
    from agent.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    if "encoder" not in bundle.manifest:
        raise ConfigError(f"--bundle {bundle_dir}: not a split bundle (no encoder), the "
                          "learner would not run")
    from agent.config import IngestConfig
    from agent.value_range import ValueRange

    ing = IngestConfig()           # the daemon runs with the default value range
    spec = Spec(bundle.input.n_channels, bundle.input.window_samples, bundle.classes,
                value_range=ValueRange.from_manifest(bundle.manifest, bundle.input.n_channels,
                                                     k=ing.value_range_k,
                                                     max_abs=ing.max_abs_value))
    from agent.learner import LearnerConfig

    quotas = LearnerConfig()       # the daemon's shared learner refuses classes beyond these
    campaign = Campaign(spec, PREFIX, seed=seed, new_class_quota=min(
        getattr(quotas, "max_new_classes_per_hour", 1 << 30),
        getattr(quotas, "max_classes", 1 << 30) - len(bundle.classes)))
    result: dict = {"bench": "fuzz", "environment": environment(), "seed": seed,
                    "payloads": n_payloads, "bundle": bundle.bundle_id}
    with ExitStack() as stack:
        tmp = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="reverie-fuzz-")))
        broker, url = procs.start_broker(tmp)
        stack.callback(broker.close)
        state_dir = tmp / "state"
        env = {**os.environ, "REVERIE_STATE_DIR": str(state_dir),
               "REVERIE_INGEST_LABEL_WAIT_S": str(LABEL_WAIT_S)}
        daemon = procs.DaemonProcess(bundle_dir, url, "+", PREFIX, tmp, env=env)
        stack.callback(daemon.close)
        daemon.wait_serving()
        pid = daemon.pid
        before = daemon.scrape()
        pub = stack.enter_context(_Publisher(url))
        t0 = time.perf_counter()
        sent = _publish(campaign, n_payloads, pub, daemon, before)
        publish_s = time.perf_counter() - t0
        after = _settle(daemon, before, sent)
        result["wall_s"] = time.perf_counter() - t0
        result["publish_s"] = publish_s
        result["alive"] = daemon.proc.poll() is None and daemon.pid == pid
        # The end of the campaign is a crash: SIGKILL, then the agent must come back on
        # its state and hold every label it acknowledged.
        daemon.proc.kill()
        daemon.proc.wait(30)
        again = procs.DaemonProcess(bundle_dir, url, "+", PREFIX, tmp, env=env)
        stack.callback(again.close)
        try:
            again.wait_serving()
            result["restarted"] = True
        except ReverieError as exc:
            result["restarted"] = False
            result["restart_error"] = str(exc)[-500:]
        result["exit_code"] = _stop(again)
        result.update(_accounting(sent, before, after))
        result["bugs"] = [{"kind": m.kind, "family": m.family, "payload": m.payload[:200]
                           .decode("utf-8", "replace")} for m in campaign.bugs[:10]]
        result["n_bug_payloads"] = len(campaign.bugs)
        result["state"] = check_state(bundle_dir, state_dir, campaign.learned_keys)
    checks = {"alive": result["alive"], "restarted_after_sigkill": result["restarted"],
              "exit_0": result["exit_code"] == 0,
              "no_reconnects": result["reconnects"] == 0,
              "drops_match": result["drops_match"],
              "predictions": result["predictions"] == result["valid_frames"],
              "labels_learned": result["labels_learned"] == result["valid_labels"],
              "finite_state": result["state"]["finite"],
              "acknowledged_labels_held": not result["state"]["missing_keys"]}
    result["checks"] = checks
    result["passed"] = all(checks.values())
    return result


class _Publisher:
    """A paho MQTT 5 client in its own network thread."""

    def __init__(self, url: str):
        from agent.mqtt import BrokerURL, connect_and_wait, make_client

        u = BrokerURL.parse(url)
        self.client = make_client(u, client_id="reverie-fuzz")
        self.client.max_inflight_messages_set(100)     # mosquitto's max_inflight_messages
        connect_and_wait(self.client, u)                # BrokerError (a ReverieError) if not

    def publish(self, topic: str, payload: bytes, qos: int):
        return self.client.publish(topic, payload, qos=qos)

    def __enter__(self) -> _Publisher:
        return self

    def __exit__(self, *exc) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _received(m: dict[str, float]) -> float:
    """Messages the daemon took from the broker: valid topics + refused topics."""
    return sum(v for k, v in m.items() if k.startswith("reverie_messages_received_total")) \
        + m.get('reverie_dropped_total{reason="bad_topic"}', 0.0)


def _publish(campaign, n: int, pub: _Publisher, daemon, before: dict) -> list:
    """Publish `n` messages, paced by the daemon's receipts; return them."""
    sent = []
    base = _received(before)
    last = None
    for i in range(n):
        if i == n // 2:                           # consolidation while the fuzzing goes on
            _sleep_cmd(pub, campaign.valid[0])
        msg = campaign.next()
        last = pub.publish(f"{PREFIX}/{msg.device}/{msg.kind}", msg.payload, msg.qos)
        sent.append(msg)
        if (i + 1) % (WINDOW // 2) == 0:
            _wait(lambda m, k=i + 1: _received(m) - base >= k + 1 - WINDOW  # +1: the sleep
                  and m.get("reverie_queue_depth", 0) < 1000, daemon, what="receipts")
    if last is not None:
        last.wait_for_publish(30)
    return sent


def _sleep_cmd(pub: _Publisher, device: str) -> None:
    pub.publish(f"{PREFIX}/{device}/cmd", b'{"id":"fuzz-sleep","cmd":"sleep","budget_s":5}', 1)


def _wait(ok, daemon, *, what: str, timeout_s: float = SETTLE_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        if daemon.proc.poll() is not None:
            raise ReverieError(f"the daemon exited with code {daemon.proc.returncode} "
                               f"(waiting for {what}){daemon._tail()}")
        m = daemon.scrape()
        if ok(m):
            return m
        if time.monotonic() > deadline:
            raise ReverieError(f"the daemon did not catch up ({what}) within {timeout_s} s")
        time.sleep(0.05)


def _expected(sent: list) -> collections.Counter:
    want: collections.Counter = collections.Counter()
    for m in sent:
        if m.expect is not None:
            # the worker's guard counts a control message's bug, then its rejection
            want[m.expect] += 2 if m.expect == "internal_error" and m.kind != "frames" else 1
    return want


def _settle(daemon, before: dict, sent: list) -> dict:
    """Wait until every expected drop, prediction and learned label is counted, and the
    sleep finished; return the final metrics (or the last ones on a timeout)."""
    want = sum(_expected(sent).values())
    frames = sum(1 for m in sent if m.family.startswith("valid_frame"))
    labels = sum(1 for m in sent if m.family.startswith("valid_label"))

    def delta(m, name):
        return m.get(name, 0.0) - before.get(name, 0.0)

    def done(m):
        return (_drops(m, before).total() >= want
                and delta(m, "reverie_predictions_total") >= frames
                and delta(m, "reverie_labels_learned_total") >= labels
                and sum(v for k, v in m.items() if k.startswith("reverie_sleeps_total")) >= 1
                and m.get("reverie_sleeping", 0) == 0)

    try:
        _wait(done, daemon, what="the counters")
    except ReverieError:
        if daemon.proc.poll() is not None:
            raise
    time.sleep(1.0)           # anything still arriving would show as a mismatch
    return daemon.scrape()


def _drops(m: dict, before: dict) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for k, v in m.items():
        if k.startswith("reverie_dropped_total{"):
            reason = k.split('reason="', 1)[1].rstrip('"}')
            if v - before.get(k, 0.0) > 0:
                out[reason] = int(v - before.get(k, 0.0))
    return out


def _accounting(sent: list, before: dict, after: dict) -> dict:
    want, got = _expected(sent), _drops(after, before)
    reasons = sorted(set(want) | set(got), key=lambda r: (-got.get(r, 0), r))
    fams = collections.Counter(f"{m.kind}/{m.family}" for m in sent)

    def delta(name):
        return int(after.get(name, 0.0) - before.get(name, 0.0))

    return {
        "sent": len(sent), "malformed": sum(1 for m in sent if m.expect is not None),
        "valid_frames": sum(1 for m in sent if m.family.startswith("valid_frame")),
        "valid_labels": sum(1 for m in sent if m.family.startswith("valid_label")),
        "semantic": sum(1 for m in sent if m.family.startswith(
            ("valid_frame_", "valid_label_", "huge_finite", "frame_extreme", "label_",
             "window_id_flood"))),
        "qos1": sum(1 for m in sent if m.qos == 1),
        "devices": len({m.device for m in sent}),
        "rejections": [{"reason": r, "expected": want.get(r, 0), "counted": got.get(r, 0)}
                       for r in reasons],
        "drops_expected": sum(want.values()), "drops_counted": sum(got.values()),
        "drops_match": want == got,
        "predictions": delta("reverie_predictions_total"),
        "labels_learned": delta("reverie_labels_learned_total"),
        "sleeps": {k.split('outcome="', 1)[1].rstrip('"}'): int(v) for k, v in after.items()
                   if k.startswith("reverie_sleeps_total{")},
        "reconnects": delta("reverie_reconnects_total"),
        "outbox_dropped": delta("reverie_outbox_dropped_total"),
        "families": dict(sorted(fams.items())),
    }


def _stop(daemon) -> int | None:
    daemon.proc.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(60)
    except ReverieError:
        return None


def check_state(bundle_dir: Path, state_dir: Path, keys: list[str] = ()) -> dict:
    """Load the daemon's state into a Learner; are memory latents and adapters finite,
    and does it hold every label key in `keys` (the labels the daemon acknowledged)?"""
    from agent.learner.learner import Learner

    with Learner.load(state_dir, bundle_dir) as learner:
        missing = [k for k in keys if not learner.seen(k)]
        memory = learner.memory.state_arrays()
        adapter = learner.adapted_head.state_arrays() if learner.adapted_head.version else {}
        arrays = {**{f"memory.{k}": v for k, v in memory.items()},
                  **{f"adapter.{k}": v for k, v in adapter.items()}}
        bad = sorted(k for k, v in arrays.items()
                     if v.dtype.kind in "fc" and not np.isfinite(v).all())
        return {"episodes": len(learner.memory),
                "adapter_version": int(learner.adapted_head.version),
                "classes": len(learner.classes), "arrays_checked": len(arrays),
                "non_finite": bad, "finite": not bad, "labels_checked": len(keys),
                "missing_keys": missing[:20]}


def _print(r: dict) -> None:
    print(f"reverie bench fuzz: {r['sent']} payloads ({r['malformed']} malformed, "
          f"{r['valid_frames']} valid frames, {r['valid_labels']} valid labels, "
          f"{r['qos1']} at QoS 1) to {r['devices']} device ids, seed {r['seed']}")
    print_table(r["rejections"], ["reason", "expected", "counted"],
                title="\nrejections (reverie_dropped_total by reason)")
    s = r["state"]
    print(f"\ndrops expected {r['drops_expected']}, counted {r['drops_counted']}; predictions "
          f"{r['predictions']}/{r['valid_frames']}; labels learned "
          f"{r['labels_learned']}/{r['valid_labels']}; sleeps {r['sleeps']}; outbox drops "
          f"{r['outbox_dropped']}; reconnects {r['reconnects']}")
    print(f"daemon alive to the end: {r['alive']}; SIGKILL, restarted: {r['restarted']}; exit "
          f"code after SIGTERM: {r['exit_code']}; state: {s['episodes']} episodes, adapter "
          f"v{s['adapter_version']}, {s['arrays_checked']} arrays, non-finite: "
          f"{s['non_finite'] or 'none'}; acknowledged labels held: "
          f"{s['labels_checked'] - len(s['missing_keys'])}/{s['labels_checked']}")
    if r["n_bug_payloads"]:
        print(f"decoder bugs (internal_error): {r['n_bug_payloads']} payloads, e.g. "
              f"{r['bugs'][0]}")
    print(f"wall time {r['wall_s']:.1f} s (publishing {r['publish_s']:.1f} s, "
          f"{r['sent'] / r['publish_s']:.0f} msg/s); crashes: {0 if r['alive'] else 1}; "
          f"{'PASS' if r['passed'] else 'FAIL: ' + str(r['checks'])}")
