"""agent.sdnotify against a real unix datagram socket, and the shipped systemd unit."""

from __future__ import annotations

import configparser
import importlib.resources
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid

import pytest

from agent.errors import ConfigError
from agent.sdnotify import SystemdNotifier

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs unix sockets")


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)  # a missing datagram fails the test instead of hanging it
    return sock


@pytest.fixture
def notify_socket(tmp_path):
    """(NOTIFY_SOCKET value, the bound receiving socket): what systemd sets up."""
    path = tmp_path / "n.sock"
    if len(str(path)) >= 100:  # sun_path holds 108 bytes
        pytest.skip(f"tmp_path too long for a unix socket: {path}")
    sock = _receiver(str(path))
    yield str(path), sock
    sock.close()


def test_exact_datagrams(notify_socket):
    addr, rx = notify_socket
    n = SystemdNotifier(env={"NOTIFY_SOCKET": addr})
    assert n.enabled
    assert n.ready("listening on mqtt://broker:1883")
    assert rx.recv(4096) == b"READY=1\nSTATUS=listening on mqtt://broker:1883"
    assert n.ready()
    assert rx.recv(4096) == b"READY=1"
    assert n.status("sleeping: 3/10 epochs")
    assert rx.recv(4096) == b"STATUS=sleeping: 3/10 epochs"
    assert n.watchdog()
    assert rx.recv(4096) == b"WATCHDOG=1"
    assert n.stopping()
    assert rx.recv(4096) == b"STOPPING=1"
    assert n.extend_timeout(1.5)
    assert rx.recv(4096) == b"EXTEND_TIMEOUT_USEC=1500000"
    assert n.notify("A=1", "B=two words", "C=")
    assert rx.recv(4096) == b"A=1\nB=two words\nC="
    n.close()


def test_status_is_flattened_to_one_line(notify_socket):
    addr, rx = notify_socket
    n = SystemdNotifier(env={"NOTIFY_SOCKET": addr})
    n.status("error:\nTraceback line\r\nlast")
    assert rx.recv(4096) == b"STATUS=error: Traceback line last"
    n.ready("ünïcode ok")
    assert rx.recv(4096) == "READY=1\nSTATUS=ünïcode ok".encode()
    n.close()


def test_abstract_namespace_socket():
    if not sys.platform.startswith("linux"):
        pytest.skip("abstract unix sockets are Linux-only")
    name = f"reverie-test-{uuid.uuid4().hex}"
    rx = _receiver(b"\0" + name.encode())
    try:
        n = SystemdNotifier(env={"NOTIFY_SOCKET": "@" + name})
        assert n.enabled and n.ready("abstract")
        assert rx.recv(4096) == b"READY=1\nSTATUS=abstract"
        n.close()
    finally:
        rx.close()


def test_concurrent_notifications_arrive_whole(notify_socket):
    addr, rx = notify_socket
    n = SystemdNotifier(env={"NOTIFY_SOCKET": addr})
    n_threads, per_thread = 4, 25
    got: list[bytes] = []
    # Read while they send: the kernel queues only a few datagrams (net.unix.max_dgram_qlen).
    reader = threading.Thread(target=lambda: got.extend(
        rx.recv(4096) for _ in range(n_threads * per_thread)))
    reader.start()
    senders = [threading.Thread(target=lambda i=i: [n.status(f"t{i} m{k}")
                                                   for k in range(per_thread)])
               for i in range(n_threads)]
    for t in senders:
        t.start()
    for t in (*senders, reader):
        t.join()
    assert sorted(got) == sorted(f"STATUS=t{i} m{k}".encode()
                                 for i in range(n_threads) for k in range(per_thread))
    n.close()


def test_stalled_reader_does_not_block_forever(notify_socket):
    addr, rx = notify_socket
    n = SystemdNotifier(env={"NOTIFY_SOCKET": addr}, send_timeout_s=0.05)
    # Nobody reads rx: once its queue is full a send times out and reports False.
    results = []
    while len(results) < 10_000 and (not results or results[-1]):
        results.append(n.watchdog())
    assert results[0] is True and results[-1] is False
    n.close()


def test_disabled_without_notify_socket():
    n = SystemdNotifier(env={})
    assert not n.enabled
    assert not any((n.ready("x"), n.status("x"), n.watchdog(), n.stopping(), n.notify("A=1")))
    assert n._sock is None  # nothing was opened
    assert SystemdNotifier(env={"NOTIFY_SOCKET": ""}).enabled is False


def test_unsupported_socket_kind_disables(caplog):
    with caplog.at_level(logging.WARNING, logger="agent.sdnotify"):
        n = SystemdNotifier(env={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled and not n.ready()
    assert "vsock:2:1234" in caplog.text


def test_delivery_failure_never_raises_and_logs_once(tmp_path, caplog):
    n = SystemdNotifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.DEBUG, logger="agent.sdnotify"):
        assert n.ready() is False
        assert n.watchdog() is False
        assert n.status("still alive") is False
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "gone.sock" in warnings[0].getMessage()
    n.close()


@pytest.mark.parametrize("field", ["READY", "STATUS=a\nREADY=1", "", 5])
def test_malformed_field_is_a_caller_bug(field):
    with pytest.raises(ValueError, match="Invalid notify field"):
        SystemdNotifier(env={}).notify(field)  # type: ignore[arg-type]


def test_watchdog_interval():
    pid = str(os.getpid())
    assert SystemdNotifier(env={}).watchdog_interval_s is None
    assert SystemdNotifier(env={"WATCHDOG_USEC": "30000000"}).watchdog_interval_s == 15.0
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}
    assert SystemdNotifier(env=env).watchdog_interval_s == 15.0
    env["WATCHDOG_PID"] = str(os.getpid() + 1)  # the watchdog is for another process
    assert SystemdNotifier(env=env).watchdog_interval_s is None
    # also works outside NOTIFY_SOCKET being set: the interval is just information
    assert SystemdNotifier(env={"WATCHDOG_USEC": "500"}).watchdog_interval_s == 0.00025


@pytest.mark.parametrize("key, value", [("WATCHDOG_USEC", "abc"), ("WATCHDOG_USEC", "0"),
                                        ("WATCHDOG_USEC", "-5"), ("WATCHDOG_PID", "x1")])
def test_bad_watchdog_env_is_named(key, value):
    with pytest.raises(ConfigError, match=f"{key}='{value}'"):
        SystemdNotifier(env={"WATCHDOG_USEC": "1000000", key: value})


# --- the shipped unit ------------------------------------------------------------------------

UNIT = importlib.resources.files("agent").joinpath("data/reverie.service")


def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read_string(UNIT.read_text())
    return cp


def test_unit_is_a_notify_service_with_watchdog():
    unit = _unit()
    svc = unit["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert int(svc["WatchdogSec"]) == 30
    argv = svc["ExecStart"].split()
    assert argv[0].endswith("/reverie") and argv[1] == "run"
    assert argv[2:] == ["--config", "/etc/reverie/agent.toml"]
    assert svc["User"] == "reverie" and svc["Restart"] == "on-failure"
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"
    assert "/var/lib/reverie" in svc["ReadWritePaths"].split()
    assert "network-online.target" in unit["Unit"]["After"]
    assert "network-online.target" in unit["Unit"]["Wants"]
    assert "Environment=NUMBA_CACHE_DIR=/opt/reverie/numba-cache" in UNIT.read_text()
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    # verify insists the ExecStart binary exists; point it at one that does.
    text = UNIT.read_text().replace("/opt/reverie/bin/reverie", shutil.which("true") or
                                    "/bin/true")
    unit = tmp_path / "reverie.service"
    unit.write_text(text)
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "reverie.service" not in out.stderr, out.stderr  # no warnings about our unit
