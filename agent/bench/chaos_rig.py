"""The rig of ``reverie bench chaos``: a broker it can kill, the daemon, a harness client,
an archive of the write-ahead log, and the audit of a state directory.

The broker is `firmware_sim.broker.EmbeddedBroker` (mosquitto, persistence on) in a child
process, as in the e2e bench (`agent` never imports `firmware_sim`); the harness kills
the mosquitto process itself (SIGKILL, found as the child's child) and asks the child to
start it again on the same port. The daemon is the real ``reverie run``
(`agent.bench.e2e.procs.DaemonProcess`).

"Exactly once" is checked against the write-ahead log's whole history: a learned label
leaves exactly one log record carrying its key (an ``episode`` when stored, a ``seen``
otherwise; agent/learner/state.py), and a redelivered one leaves none (`Learner.seen`).
The log is trimmed after checkpoints, so `WalArchive` hard-links every segment file as
it appears (a hard link keeps the inode, and with it every later append and the in-place
truncation of a torn tail); the audit then counts records per key over seqs 1..last and
reports any seq range it never saw (``gaps``: a check that could not be made, never
silently passed). A second check: the restored learner's ``n_stored`` (episodes applied:
checkpoint counter + replay) equals the number of ``episode`` records, so no record was
applied twice (e.g. replayed although a checkpoint covered it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from agent.bench.e2e.procs import Child, DaemonProcess
from agent.errors import BrokerError, ReverieError, StateError
from agent.persist.wal_format import SEGMENT_RE, scan_segment
from agent.topics import Topics

PREFIX = "reverie/chaos"
CLIENT_ID = "chaos-agent"
MAX_RECORD_BYTES = 16 << 20

# A mosquitto with persistence in argv[1]; "start" on stdin starts it again on the same
# port (after the harness killed it) and answers "started <monotonic time>".
BROKER_SCRIPT = r"""
import signal, sys, time
from firmware_sim.broker import EmbeddedBroker
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
broker = EmbeddedBroker(prefer="mosquitto", workdir=sys.argv[1], persistence=True).start()
try:
    print(broker.url, flush=True)
    for line in sys.stdin:
        if line.strip() == "start":
            broker.restart()
            print(f"started {time.monotonic()!r}", flush=True)
finally:
    broker.stop()
"""


class Broker(Child):
    """The controllable broker child; `kill` SIGKILLs or SIGTERMs mosquitto itself."""

    def __init__(self, workdir: Path):
        (workdir / "broker").mkdir(parents=True, exist_ok=True)
        super().__init__([sys.executable, "-c", BROKER_SCRIPT, str(workdir / "broker")],
                         name="broker", stderr_path=workdir / "broker.err", eof_grace_s=10.0)
        try:
            self.url = self.readline()
        except ReverieError as exc:
            self.close()
            raise BrokerError(f"cannot start a private mosquitto: {exc}") from None

    def mosquitto_pid(self) -> int:
        kids = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        if not kids:
            raise BrokerError("the broker child has no mosquitto process")
        return int(kids[0])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        pid = self.mosquitto_pid()
        os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
            if stat[stat.rindex(")") + 2] == "Z":        # exited; the child reaps it later
                return
            time.sleep(0.01)

    def start_again(self) -> float:
        """Start mosquitto on the same port; the monotonic time it accepted connections."""
        self.proc.stdin.write("start\n")
        self.proc.stdin.flush()
        return float(self.expect("started").split()[1])


def daemon_env(state_dir: Path, **settings: object) -> dict:
    """The environment of ``reverie run`` under test: a stable client id (persistent
    session), a state directory, no sleeps unless asked for, plus `settings` as
    ``REVERIE_<KEY>`` (e.g. ``checkpoint_interval_s=1``)."""
    env = dict(os.environ, REVERIE_BROKER_CLIENT_ID=CLIENT_ID, REVERIE_STATE_DIR=str(state_dir),
               REVERIE_SLEEP_IDLE_AFTER_S="3600")
    env.update({f"REVERIE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def start_daemon(bundle: Path, url: str, device: str, workdir: Path, env: dict,
                 timeout_s: float = 60.0) -> tuple[DaemonProcess, float]:
    """``reverie run`` serving `device`; (process, seconds from spawn to connected)."""
    t0 = time.monotonic()
    daemon = DaemonProcess(bundle, url, device, PREFIX, workdir, env=env)
    try:
        daemon.wait_serving(timeout_s)
    except BaseException:
        daemon.close()
        raise
    return daemon, time.monotonic() - t0


def sigkill(daemon: DaemonProcess) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    daemon.close()


class Harness:
    """The harness's MQTT client for one device: frames, labels and commands out
    (labels QoS 1, each tracked until the broker's PUBACK), events, replies and
    predictions in (with their monotonic arrival time)."""

    def __init__(self, url: str, device: str, window: int, channels: int, seed: int):
        from agent.mqtt import BrokerURL, connect_and_wait, make_client

        self.topics = Topics(device, PREFIX)
        self.window, self.channels = window, channels
        self.rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.labels: dict[str, object] = {}         # id -> MQTTMessageInfo
        self.label_events: dict[str, str] = {}      # id -> reason of its first "label" event
        self.events: list[tuple[float, dict]] = []
        self.replies: list[tuple[float, dict]] = []
        self.predictions: list[float] = []
        self._seq = 0
        self.connected = threading.Event()
        b = BrokerURL.parse(url)
        self.client = make_client(b, protocol="5")
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *_a: self.connected.clear()
        connect_and_wait(self.client, b)

    def _on_connect(self, client, _u, _f, rc, _p) -> None:
        if not rc.is_failure:
            t = self.topics
            client.subscribe([(t.events, 1), (t.replies, 1), (t.predictions, 0)])
            self.connected.set()

    def _on_message(self, _c, _u, msg) -> None:
        now = time.monotonic()
        if msg.topic == self.topics.predictions:
            self.predictions.append(now)
            return
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        with self._lock:
            if msg.topic == self.topics.replies:
                self.replies.append((now, body))
            else:
                self.events.append((now, body))
                if body.get("type") == "label":
                    self.label_events.setdefault(str(body.get("id")), str(body.get("reason")))

    def frame(self) -> None:
        """One binary frame of a whole window (QoS 0)."""
        from agent.protocol import BINARY_HEADER, BINARY_MAGIC, PROTOCOL_VERSION

        values = self.rng.standard_normal((self.window, self.channels)).astype("<f4")
        head = BINARY_HEADER.pack(BINARY_MAGIC, PROTOCOL_VERSION, 0, self._seq, time.time(),
                                  self.window, self.channels)
        self._seq += 1
        self.client.publish(self.topics.frames, head + values.tobytes(), qos=0)

    def label(self, label_id: str, cls: str) -> None:
        """A QoS 1 label with its window inline (key ``{device}/{id}``)."""
        values = np.round(self.rng.standard_normal((self.window, self.channels)), 3)
        body = {"id": label_id, "label": cls, "values": values.tolist()}
        info = self.client.publish(self.topics.labels, json.dumps(body), qos=1)
        with self._lock:
            self.labels[label_id] = info

    def command(self, cmd: str, **args: object) -> None:
        body = {"id": f"c{time.monotonic_ns()}", "cmd": cmd, **args}
        self.client.publish(self.topics.cmd, json.dumps(body), qos=1)

    def accepted(self) -> list[str]:
        """Label ids the broker acknowledged (PUBACK): the ones that must be learned."""
        with self._lock:
            return [i for i, info in self.labels.items() if _published(info)]

    def wait(self, cond, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.02)
        return cond()

    def predictions_after(self, t: float) -> int:
        return sum(1 for x in self.predictions[-200:] if x > t)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _published(info) -> bool:
    try:
        return info.is_published()
    except RuntimeError:          # paho: published while disconnected, so never sent
        return False


class WalArchive:
    """Hard links to every log segment the daemon ever had (see the module docstring).

    Call `poll` often (a thread does with `start`); a segment lives until three later
    checkpoints exist, so polling every few tens of ms misses none, and a miss would show
    as a gap in the audit anyway.
    """

    def __init__(self, wal_dir: Path, archive_dir: Path, every_s: float = 0.02):
        self.wal_dir, self.dir, self.every_s = wal_dir, archive_dir, every_s
        archive_dir.mkdir(parents=True, exist_ok=True)
        self._seen: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-archive", daemon=True)

    def poll(self) -> None:
        try:
            names = os.listdir(self.wal_dir)
        except FileNotFoundError:
            return
        for name in names:
            if not SEGMENT_RE.match(name):
                continue
            try:
                ino = os.stat(self.wal_dir / name).st_ino
                if (name, ino) not in self._seen:
                    os.link(self.wal_dir / name, self.dir / f"{name}@{ino}")
                    self._seen.add((name, ino))
            except FileNotFoundError:
                continue
            except FileExistsError:
                self._seen.add((name, ino))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def start(self) -> WalArchive:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.poll()

    def records(self) -> tuple[dict[int, tuple[str, str | None]], int]:
        """``({seq: (kind, key)}, rewritten)``: every record found; `rewritten` counts seqs
        found with two different payloads (a reused seq)."""
        from agent.learner.state import LearnerState

        out: dict[int, tuple[str, str | None]] = {}
        payloads: dict[int, bytes] = {}
        rewritten = 0
        for path in sorted(self.dir.iterdir()):
            first = int(SEGMENT_RE.match(path.name.split("@")[0]).group(1))
            for seq, payload in scan_segment(path.read_bytes(), first, MAX_RECORD_BYTES).records:
                if seq in payloads:
                    rewritten += payloads[seq] != payload
                    continue
                payloads[seq] = payload
                kind, meta, _arrays = LearnerState.decode_record(payload)
                out[seq] = (kind, meta.get("key_digest", meta.get("key")))
        return out, rewritten


def gaps(seqs, last: int) -> list[list[int]]:
    """Ranges of 1..last missing from `seqs`, as [first, last] pairs."""
    have = set(seqs)
    out: list[list[int]] = []
    for s in range(1, last + 1):
        if s in have:
            continue
        if out and out[-1][1] == s - 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def check_files(state_dir: Path, scratch: Path) -> dict:
    """After a kill, before the restart: evidence of what the kill interrupted (a
    checkpoint being written, a torn log record) and whether a copy of the state
    recovers strictly (any damage but a torn tail raises)."""
    from agent.persist import StateDir

    ck = state_dir / "checkpoints"
    mid_checkpoint = ck.is_dir() and any(p.name.startswith(".tmp-") for p in ck.iterdir())
    segs = sorted((state_dir / "wal").glob("wal-*.log"))
    torn = False
    if segs:
        first = int(SEGMENT_RE.match(segs[-1].name).group(1))
        dmg = scan_segment(segs[-1].read_bytes(), first, MAX_RECORD_BYTES).damage
        torn = dmg is not None and dmg.kind == "torn"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(state_dir, scratch)
    (scratch / "LOCK").unlink(missing_ok=True)
    error = None
    try:
        with StateDir(scratch, strict=True) as state:
            warnings = state.recover().warnings
    except StateError as exc:
        error, warnings = str(exc), []
    shutil.rmtree(scratch, ignore_errors=True)
    return {"mid_checkpoint": mid_checkpoint, "torn_tail": torn, "error": error,
            "warnings": warnings}


def audit(bundle: Path, state_dir: Path, archive: WalArchive, keys: list[str]) -> dict:
    """The final verdict on a state directory (daemon stopped): it loads; every key in
    `keys` is learned; each learned key has exactly one log record; no record was applied
    twice. See the module docstring for what "exactly once" is checked against."""
    from agent.learner import Learner

    archive.stop()
    with Learner.from_bundle(bundle, state_dir=state_dir) as learner:
        missing = [k for k in keys if not learner.seen(k)]
        n_stored, warnings = learner.n_stored, list(learner.recovery_warnings)
        last = learner.state.wal.last_seq if learner.state else 0
    records, rewritten = archive.records()
    last = max([last, *records])
    per_key = Counter(key for _kind, key in records.values() if key is not None)
    duplicated = sorted(k for k, n in per_key.items() if n > 1)
    episodes = sum(1 for kind, _key in records.values() if kind == "episode")
    return {"loads": True, "keys": len(keys), "missing": missing, "duplicated": duplicated,
            "records": len(records), "last_seq": last, "gaps": gaps(records, last),
            "rewritten_seqs": rewritten, "episode_records": episodes, "n_stored": n_stored,
            "n_stored_matches_log": n_stored == episodes, "recovery_warnings": warnings}
