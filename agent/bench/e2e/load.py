"""The load processes of ``reverie bench e2e``: a frame publisher and a subscriber.

Each runs in a process of its own (``python -m agent.bench.e2e.load pub|sub ...``) so
that the harness, the broker, the daemon and the load never share an interpreter (or a
GIL). Times are ``time.monotonic()``: CLOCK_MONOTONIC is system-wide on Linux, so a
publish time taken here and a receipt time taken in the subscriber process compare.

``pub`` sends binary frames (agent/protocol.py) to ``{prefix}/{device}/frames``, QoS 0,
devices round robin: message ``i`` goes to device ``i % n`` with ``seq = seq0 + i // n``.
With ``--rate 0`` it floods (as fast as the socket takes them: no network thread, each
publish writes straight to the socket and a full socket buffer blocks in select()); with
``--rate R`` it paces: message ``i`` is due at ``t0 + i / R``, every due message is sent
back to back, then one sleep until the next is due (batch sleeps, so the achieved rate
does not depend on the sleep granularity). It sends whole rounds only (``--round``
messages: every device gets whole windows), prints ``start T`` when the first message
goes out and a JSON summary at the end; ``--times FILE`` saves each publish time (.npy).

``sub`` subscribes, prints ``ready`` after the SUBACK and runs until its stdin closes.
``--mode count``: an (almost) empty callback that counts, sampled every 10 ms into
``(t, n)`` rows (the raw ceiling). ``--mode predictions``: records ``(device, seq_last,
t_receipt, latency_ms)`` of every prediction. Both save an .npz to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import select
import socket
import sys
import threading
import time

import numpy as np

from agent.mqtt import BrokerURL, make_client
from agent.protocol import BINARY_HEADER, BINARY_MAGIC, PROTOCOL_VERSION
from agent.topics import Topics

N_BLOCKS = 16               # distinct value blocks cycled through (values do not matter)
SAMPLE_EVERY_S = 0.01
CONNECT_TIMEOUT_S = 10.0


def _connect(url: str, *, threaded: bool):
    """A connected MQTT 5 client; without a network thread when `threaded` is False."""
    b = BrokerURL.parse(url)
    client = make_client(b, protocol="5")
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.connect(b.host, b.port, keepalive=60)
    # paho leaves Nagle on: a frame would wait for the ACK of the previous one (up to a
    # delayed-ACK timeout), which is the harness's latency, not the daemon's.
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    if threaded:
        client.loop_start()
        ok = connected.wait(CONNECT_TIMEOUT_S)
    else:
        while not connected.is_set() and time.monotonic() < deadline:
            client.loop(timeout=0.05)
        ok = connected.is_set()
    if not ok:
        raise SystemExit(f"e2e load: no CONNACK from {url} within {CONNECT_TIMEOUT_S} s")
    return client


def _flush(client, sock, timeout_s: float = 5.0) -> None:
    """Write what paho still holds for the socket (it holds it when the socket is full)."""
    deadline = time.monotonic() + timeout_s
    while client.want_write() and time.monotonic() < deadline:
        select.select([], [sock], [], 0.1)
        client.loop_write()


def publish(args: argparse.Namespace) -> dict:
    devices = [d for d in args.devices.split(",") if d]
    topics = [Topics(d, args.prefix).frames for d in devices]
    n_dev = len(devices)
    rng = np.random.default_rng(args.seed)
    blocks = [rng.standard_normal((args.samples, args.channels)).astype("<f4").tobytes()
              for _ in range(N_BLOCKS)]
    round_size = args.round
    total = None
    if args.rate > 0:
        total = max(1, math.ceil(args.rate * args.seconds / round_size)) * round_size
    times = np.empty(total if total is not None else 0, np.float64) if args.times else None
    client = _connect(args.url, threaded=False)
    sock = client.socket()
    pack, clock, wall = BINARY_HEADER.pack, time.monotonic, time.time
    S, C, seq0 = args.samples, args.channels, args.seq0
    t0 = clock()
    t_end = t0 + args.seconds
    print(f"start {t0!r}", flush=True)
    i, t_first, t_last, next_misc = 0, t0, t0, t0 + 0.5
    recorded: list[float] = []
    while True:
        now = clock()
        if total is not None:
            if i >= total:
                break
            due = min(total, int((now - t0) * args.rate) + 1)
        else:
            if now >= t_end and i % round_size == 0:
                break
            due = i + round_size
        while i < due:
            seq = seq0 + i // n_dev
            payload = pack(BINARY_MAGIC, PROTOCOL_VERSION, 0, seq, wall(), S, C) + blocks[i % N_BLOCKS]
            t_last = clock()
            client.publish(topics[i % n_dev], payload, qos=0)
            if times is not None:
                if total is not None:
                    times[i] = t_last
                else:
                    recorded.append(t_last)
            if i == 0:
                t_first = t_last
            i += 1
            if client.want_write():          # the socket is full: wait for the broker
                _flush(client, sock)
        if now >= next_misc:                 # keepalive, incoming PINGRESP
            client.loop(timeout=0)
            next_misc = now + 0.5
        if total is not None and i < total:
            pause = t0 + i / args.rate - clock()
            if pause > 0:
                time.sleep(pause)
    _flush(client, sock)
    client.disconnect()
    if args.times:
        np.save(args.times, times if total is not None else np.asarray(recorded, np.float64))
    span = t_last - t_first
    return {"sent": i, "t_first": t_first, "t_last": t_last,
            "rate": (i - 1) / span if i > 1 and span > 0 else None,
            "seq_next": seq0 + i // n_dev}


def subscribe(args: argparse.Namespace) -> None:
    count = 0
    records: list[tuple[str, int, float, float]] = []
    clock = time.monotonic

    def on_count(_c, _u, _msg) -> None:
        nonlocal count
        count += 1

    def on_prediction(_c, _u, msg) -> None:
        t = clock()
        try:
            body = json.loads(msg.payload)
            records.append((body["device"], int(body["seq_last"]), t,
                            float(body.get("latency_ms", math.nan))))
        except (ValueError, KeyError, TypeError):
            pass                                 # not a prediction: not ours to judge here

    client = _connect(args.url, threaded=True)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_message = on_count if args.mode == "count" else on_prediction
    client.subscribe(args.topic, qos=0)
    if not subscribed.wait(CONNECT_TIMEOUT_S):
        raise SystemExit(f"e2e load: no SUBACK for {args.topic!r}")
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_EVERY_S):
            samples.append((clock(), count))

    sampler = threading.Thread(target=sample, daemon=True)
    if args.mode == "count":
        sampler.start()
    print("ready", flush=True)
    sys.stdin.read()                             # until the harness closes our stdin
    time.sleep(args.linger)
    done.set()
    client.loop_stop()
    client.disconnect()
    if args.mode == "count":
        sampler.join()
        np.savez(args.out, samples=np.asarray(samples, np.float64).reshape(-1, 2))
    else:
        rec = list(records)
        np.savez(args.out, device=np.asarray([r[0] for r in rec], dtype=str),
                 seq_last=np.asarray([r[1] for r in rec], np.int64),
                 t=np.asarray([r[2] for r in rec], np.float64),
                 latency_ms=np.asarray([r[3] for r in rec], np.float64))
    print("done", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.bench.e2e.load")
    sub = p.add_subparsers(dest="role", required=True)
    pub = sub.add_parser("pub")
    pub.add_argument("--url", required=True)
    pub.add_argument("--prefix", required=True)
    pub.add_argument("--devices", required=True, help="comma-separated device ids")
    pub.add_argument("--samples", type=int, required=True)
    pub.add_argument("--channels", type=int, required=True)
    pub.add_argument("--rate", type=float, default=0.0, help="messages/s; 0: flood")
    pub.add_argument("--seconds", type=float, required=True)
    pub.add_argument("--round", type=int, default=1, help="send whole multiples of this")
    pub.add_argument("--seq0", type=int, default=0)
    pub.add_argument("--seed", type=int, default=0)
    pub.add_argument("--times", default=None, help=".npy of publish times")
    s = sub.add_parser("sub")
    s.add_argument("--url", required=True)
    s.add_argument("--topic", required=True)
    s.add_argument("--mode", choices=["count", "predictions"], required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--linger", type=float, default=0.2, help="seconds kept after stdin closes")
    args = p.parse_args(argv)
    if args.role == "pub":
        print(json.dumps(publish(args)), flush=True)
    else:
        subscribe(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
