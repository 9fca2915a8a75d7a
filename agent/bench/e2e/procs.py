"""The processes ``reverie bench e2e`` starts and watches: broker, daemon, load.

`agent` imports neither `firmware_sim` nor `export`, so the private mosquitto
(`firmware_sim.broker.EmbeddedBroker`) and, without ``--bundle``, the demo's trained
bundle (`firmware_sim.demo.ensure_bundle`) come from child processes, as ``reverie demo``
trains through `export`. The daemon is the real ``reverie run``; its figures come from
its ``/metrics`` page and from ``/proc/<pid>`` (CPU time, VmRSS), never from inside it.
Every child is owned by a `Child` and ended (SIGTERM, then SIGKILL) when it leaves scope.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from agent.errors import BrokerError, BundleError, ReverieError

START_TIMEOUT_S = 60.0       # the daemon's first start may load numba kernels from a cold cache

# Stops its mosquitto when stdin closes or on SIGTERM: a killed interpreter would orphan it.
BROKER_SCRIPT = r"""
import signal, sys
from firmware_sim.broker import EmbeddedBroker
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
broker = EmbeddedBroker(prefer="mosquitto").start()
try:
    print(broker.url, flush=True)
    sys.stdin.read()
finally:
    broker.stop()
"""

BUNDLE_SCRIPT = r"""
import sys
from pathlib import Path
from firmware_sim.demo import ensure_bundle
print(ensure_bundle(Path(sys.argv[1])), flush=True)
"""

# name, optional {labels} (greedy: a label value may hold "}"), one value (no timestamp)
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?)\s+(\S+)$")
_METRICS_ADDR = re.compile(r"metrics on http://([^\s/]+)/metrics")


class Child:
    """A child process with line-wise stdout; terminated (then killed) at `close`."""

    def __init__(self, argv: list[str], *, name: str, stderr_path: Path | None = None,
                 env: dict | None = None, eof_grace_s: float = 0.0):
        self.name = name
        self.eof_grace_s = eof_grace_s      # a child that ends on stdin EOF gets this long
        self.stderr_path = stderr_path
        err = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, env=env)
        finally:
            if stderr_path:
                err.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self) -> str:
        """The next stdout line; ReverieError (with the stderr tail) if the child died."""
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(5)
            raise ReverieError(f"{self.name} exited with code {self.proc.returncode} "
                               f"before answering{self._tail()}")
        return line.strip()

    def expect(self, prefix: str) -> str:
        """Read lines until one starts with `prefix`; return it."""
        while True:
            line = self.readline()
            if line.startswith(prefix):
                return line

    def close_stdin(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise ReverieError(f"{self.name} still running after {timeout_s} s{self._tail()}") \
                from None

    def close(self, timeout_s: float = 10.0) -> None:
        self.close_stdin()
        if self.eof_grace_s > 0:
            try:
                self.proc.wait(self.eof_grace_s)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        if self.proc.stdout:
            self.proc.stdout.close()

    def _tail(self, n: int = 15) -> str:
        if not self.stderr_path or not self.stderr_path.exists():
            return ""
        lines = self.stderr_path.read_text(errors="replace").strip().splitlines()[-n:]
        return (":\n" + "\n".join(lines)) if lines else ""

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_broker(workdir: Path) -> tuple[Child, str]:
    """A private mosquitto (EmbeddedBroker, max_queued_messages 100000) and its URL."""
    child = Child([sys.executable, "-c", BROKER_SCRIPT], name="broker",
                  stderr_path=workdir / "broker.err", eof_grace_s=10.0)
    try:
        url = child.readline()
    except ReverieError as exc:
        child.close()
        raise BrokerError(f"cannot start a private mosquitto: {exc}") from None
    return child, url


def demo_bundle(cache_dir: Path) -> Path:
    """The demo's 6-channel bundle: cached, or trained once through `export` (a child)."""
    out = subprocess.run([sys.executable, "-c", BUNDLE_SCRIPT, str(cache_dir)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise BundleError(f"cannot train or find the demo bundle in {cache_dir} (install "
                          f"reverie[train], or pass --bundle DIR):\n{out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


class DaemonProcess(Child):
    """``reverie run`` as a child with /metrics on a port it picks itself."""

    def __init__(self, bundle: Path, url: str, device_id: str, prefix: str, workdir: Path,
                 env: dict | None = None):
        tag = "gateway" if device_id == "+" else device_id
        argv = [sys.executable, "-m", "agent.cli", "run", "--bundle", str(bundle),
                "--broker", url, "--device-id", device_id, "--prefix", prefix,
                "--metrics", "127.0.0.1:0", "--log-level", "info"]
        super().__init__(argv, name=f"daemon ({tag})", env=env,
                         stderr_path=workdir / f"daemon-{tag}.log")
        self.metrics_url: str | None = None

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until the daemon serves /metrics and says it is connected."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ReverieError(f"{self.name} exited with code {self.proc.returncode}"
                                   f"{self._tail()}")
            if self.metrics_url is None:
                m = _METRICS_ADDR.search(self.stderr_path.read_text(errors="replace"))
                if m:
                    self.metrics_url = f"http://{m.group(1)}/metrics"
            if self.metrics_url and self.scrape().get("reverie_connected") == 1:
                return
            time.sleep(0.1)
        raise ReverieError(f"{self.name} not connected after {timeout_s} s{self._tail()}")

    def scrape(self) -> dict[str, float]:
        """The /metrics page as ``{"name{labels}": value}``."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return parse_metrics(resp.read().decode())

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def memory_mb(self) -> dict[str, float]:
        """VmRSS (now) and VmHWM (peak) in MB."""
        return {"rss_mb": status_kb(self.pid, "VmRSS") / 1024,
                "peak_rss_mb": status_kb(self.pid, "VmHWM") / 1024}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> ``{"name{labels}": value}`` (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_LINE.match(line)
        if m and not line.startswith("#"):
            out[m.group(1)] = float(m.group(2))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()   # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, field: str) -> float:
    """A ``kB`` field of /proc/<pid>/status, e.g. VmRSS."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise ReverieError(f"/proc/{pid}/status has no field {field!r}")


def system_busy() -> tuple[float, float]:
    """(busy, total) CPU ticks of the whole machine, from /proc/stat; diff two readings."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ticks = fields[:8]                # user..steal; guest time is already counted in user
    idle = ticks[3] + ticks[4]        # idle + iowait
    return float(sum(ticks) - idle), float(sum(ticks))
