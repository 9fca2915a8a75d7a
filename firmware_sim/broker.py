"""A throwaway MQTT broker on 127.0.0.1 for the demo and the tests.

Prefers a ``mosquitto`` subprocess (MQTT 3.1.1 and 5) and falls back to an
in-process amqtt broker (MQTT 3.1.1 only) when no mosquitto binary exists.

>>> with EmbeddedBroker() as broker:            # doctest: +SKIP
...     client.connect("127.0.0.1", broker.port)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path

from agent.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)

PREFERENCES = ("auto", "mosquitto", "amqtt")
PROTOCOLS = {"mosquitto": ("3.1.1", "5"), "amqtt": ("3.1.1",)}
# Debian puts the binary in /usr/sbin, which is often not on a non-root PATH.
MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_HOST = "127.0.0.1"
_PORT_ATTEMPTS = 5


def find_binary(name: str, candidates: tuple[str, ...]) -> str | None:
    """`name` on PATH, else the first executable of `candidates` (sbin is often not on
    PATH), else None."""
    found = shutil.which(name)
    if found:
        return found
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_mosquitto() -> str | None:
    """Path of a mosquitto binary, or None when there is none."""
    return find_binary("mosquitto", MOSQUITTO_CANDIDATES)


def amqtt_available() -> bool:
    try:
        import amqtt.broker  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_kind(prefer: str = "auto") -> str:
    """The broker kind `prefer` selects here: ``"mosquitto"`` or ``"amqtt"``."""
    if prefer not in PREFERENCES:
        raise ConfigError(f"Invalid broker preference: {prefer!r} (expected one of {PREFERENCES})")
    found = find_mosquitto() if prefer in ("mosquitto", "auto") else None
    if prefer == "mosquitto" or (prefer == "auto" and found):
        if found is None:
            raise BrokerError(
                "No mosquitto binary found (searched PATH and "
                f"{', '.join(MOSQUITTO_CANDIDATES)}); install mosquitto or use prefer='amqtt'")
        return "mosquitto"
    if not amqtt_available():
        raise BrokerError("No mosquitto binary found and amqtt is not installed "
                          "(pip install 'reverie[sim]')")
    return "amqtt"


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (callers must handle the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return sock.getsockname()[1]


def accepts(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port`."""
    try:
        with socket.create_connection((_HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


class _PortInUse(BrokerError):
    """The chosen port was taken: a fresh port may succeed."""


class EmbeddedBroker:
    """An MQTT broker listening on 127.0.0.1, started and stopped by its owner.

    `prefer`: ``"auto"`` (mosquitto if a binary exists, else amqtt), ``"mosquitto"`` or
    ``"amqtt"``. `port`: fixed port, or None for a free one. `workdir`: directory for the
    config, log and persistence file (kept); None means a private temp dir removed at
    stop(). `persistence`: mosquitto keeps sessions and retained messages across
    restart() in ``workdir/mosquitto.db``.
    """

    def __init__(self, prefer: str = "auto", port: int | None = None,
                 workdir: str | os.PathLike | None = None, *, persistence: bool = False,
                 start_timeout_s: float = 10.0):
        if prefer not in PREFERENCES:
            raise ConfigError(f"Invalid broker preference: {prefer!r} (expected one of {PREFERENCES})")
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"Invalid broker port: {port!r} (expected 1-65535 or None)")
        self.prefer = prefer
        self.requested_port = port
        self.workdir = Path(workdir) if workdir is not None else None
        self.persistence = persistence
        self.start_timeout_s = start_timeout_s
        self._kind: str | None = None
        self._port: int | None = None
        self._dir: Path | None = None
        self._owns_dir = False
        self._dir_reaper: weakref.finalize | None = None
        self._backend: _MosquittoProcess | _AmqttThread | None = None

    # -- properties -------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._backend is not None

    @property
    def kind(self) -> str:
        return self._require(self._kind)

    @property
    def port(self) -> int:
        return self._require(self._port)

    @property
    def url(self) -> str:
        return f"mqtt://{_HOST}:{self.port}"

    @property
    def protocols(self) -> tuple[str, ...]:
        return PROTOCOLS[self.kind]

    @property
    def log_path(self) -> Path | None:
        """mosquitto's log file (None for amqtt, which logs through `logging`)."""
        return self._dir / "mosquitto.log" if self._dir and self._kind == "mosquitto" else None

    def _require(self, value):
        if value is None:
            raise BrokerError("EmbeddedBroker is not running: call start() first")
        return value

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> EmbeddedBroker:
        if self._backend is not None:
            return self
        kind = resolve_kind(self.prefer)
        if self.persistence and kind != "mosquitto":
            raise BrokerError("persistence=True needs mosquitto; amqtt keeps no state on disk")
        if self.prefer == "auto":
            log.info("embedded broker: using %s", f"mosquitto ({find_mosquitto()})" if kind == "mosquitto"
                     else "in-process amqtt (no mosquitto binary found; MQTT 3.1.1 only)")
        self._kind = kind
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._dir, self._owns_dir = self.workdir, False
        else:
            self._dir, self._owns_dir = Path(tempfile.mkdtemp(prefix="reverie-broker-")), True
            self._dir_reaper = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        try:
            self._launch(self.requested_port)
        except BaseException:
            self._cleanup_dir()
            self._kind = None
            raise
        return self

    def stop(self) -> None:
        """Stop the broker and remove its private temp dir; a no-op when not running."""
        backend, self._backend = self._backend, None
        try:
            if backend is not None:
                backend.stop()
        finally:
            self._cleanup_dir()
            self._port = None

    def restart(self) -> None:
        """Stop and start again on the same port, keeping the workdir (and persistence)."""
        port = self.port
        backend, self._backend = self._backend, None
        backend.stop()
        self._launch(port, settle_s=3.0)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"{self._kind} on {self.url}" if self.running else "stopped"
        return f"EmbeddedBroker({state})"

    # -- internals --------------------------------------------------------------------
    def _launch(self, port: int | None, settle_s: float = 0.0) -> None:
        """Start the backend; a free port that was stolen is retried with another one,
        a fixed port that is still held (restart) is retried for up to `settle_s`."""
        deadline = time.monotonic() + settle_s
        attempt = 0
        while True:
            attempt += 1
            chosen = port if port is not None else free_port()
            backend = (_MosquittoProcess(chosen, self._dir, persistence=self.persistence)
                       if self._kind == "mosquitto" else _AmqttThread(chosen))
            try:
                backend.start(self.start_timeout_s)
            except _PortInUse:
                if port is None and attempt < _PORT_ATTEMPTS:
                    continue
                if port is not None and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                raise
            self._backend, self._port = backend, chosen
            log.debug("embedded %s broker listening on %s:%d", self._kind, _HOST, chosen)
            return

    def _cleanup_dir(self) -> None:
        if self._owns_dir and self._dir_reaper is not None:
            self._dir_reaper()  # removes the private dir, once
            self._dir, self._dir_reaper = None, None


class _MosquittoProcess:
    """One mosquitto subprocess with a generated config in `workdir`."""

    def __init__(self, port: int, workdir: Path, *, persistence: bool):
        self.port = port
        self.workdir = workdir
        self.persistence = persistence
        self.conf_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.out_path = workdir / "mosquitto.out"
        self._proc: subprocess.Popen | None = None
        self._reaper: weakref.finalize | None = None

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} {_HOST}",
            "allow_anonymous true",
            # The default of 1000 silently drops messages to slow subscribers.
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error", "log_type warning", "log_type notice",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/",
                      "persistence_file mosquitto.db"]
        else:
            lines.append("persistence false")
        if os.geteuid() == 0:
            # As root mosquitto switches to user `mosquitto`, which then cannot open the
            # log or persistence file in our root-only (0700) dir: stay root instead.
            lines.insert(0, "user root")
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError("No mosquitto binary found")
        self.conf_path.write_text(self.config_text())
        self.log_path.write_text("")  # a fresh log per attempt: errors below are ours
        with open(self.out_path, "wb") as out:
            self._proc = subprocess.Popen([binary, "-c", str(self.conf_path)], stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT)
        # No orphaned broker if the owner never calls stop() (runs at interpreter exit too).
        self._reaper = weakref.finalize(self, self._proc.terminate)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if accepts(self.port):
                # A listener that is not ours may answer while ours is failing to bind.
                time.sleep(0.02)
                if self._proc.poll() is None:
                    return
                break
            time.sleep(0.02)
        code = self._proc.poll()
        tail = self.log_tail()
        self.stop()
        if "Address already in use" in tail:
            raise _PortInUse(f"mosquitto could not bind {_HOST}:{self.port}: {tail}")
        state = f"exited with code {code}" if code is not None else f"not listening after {timeout_s} s"
        raise BrokerError(f"mosquitto on {_HOST}:{self.port} {state}; log tail:\n{tail}")

    def log_tail(self, n_lines: int = 20) -> str:
        text = ""
        for path in (self.out_path, self.log_path):
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        return "\n".join(text.strip().splitlines()[-n_lines:]) or "(empty)"

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if self._reaper is not None:
            self._reaper.detach()
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # lets mosquitto write its persistence file
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("mosquitto on port %d ignored SIGTERM for %.0f s: killing it",
                        self.port, timeout_s)
            proc.kill()
            proc.wait(timeout_s)


class _AmqttThread:
    """An amqtt Broker on its own event loop in a daemon thread."""

    def __init__(self, port: int):
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None

    def config(self) -> dict:
        # An explicit plugin list replaces amqtt's defaults: no $SYS publisher and no
        # per-packet event logging, only anonymous authentication.
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{_HOST}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        }

    def start(self, timeout_s: float) -> None:
        if not amqtt_available():
            raise BrokerError("amqtt is not installed (pip install 'reverie[sim]')")
        started: concurrent.futures.Future = concurrent.futures.Future()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(started,),
                                        name=f"amqtt-broker-{self.port}", daemon=True)
        self._thread.start()
        try:
            started.result(timeout_s)
        except concurrent.futures.TimeoutError:
            self.stop()
            raise BrokerError(f"amqtt on {_HOST}:{self.port} did not start within {timeout_s} s") from None
        except Exception as exc:
            self._thread.join(timeout_s)
            cause = exc.__cause__ or exc
            if isinstance(cause, OSError) and "in use" in str(cause):
                raise _PortInUse(f"amqtt could not bind {_HOST}:{self.port}: {cause}") from exc
            raise BrokerError(f"amqtt on {_HOST}:{self.port} failed to start: {cause}") from exc

    def _run(self, started: concurrent.futures.Future) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._boot())
        except BaseException as exc:
            started.set_exception(exc)
            self._close_loop()
            return
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            self._close_loop()

    async def _boot(self) -> None:
        from amqtt.broker import Broker

        self._broker = Broker(self.config())
        await self._broker.start()

    def _close_loop(self) -> None:
        loop = self._loop
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        asyncio.set_event_loop(None)
        loop.close()

    def stop(self, timeout_s: float = 5.0) -> None:
        loop, thread, broker = self._loop, self._thread, self._broker
        self._thread = self._broker = None
        if thread is None or not thread.is_alive():
            return
        if broker is not None and broker.transitions.state == "started":
            fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            try:
                fut.result(timeout_s)
            except Exception as exc:  # still stop the loop below; the caller only wants it gone
                log.warning("amqtt shutdown on port %d failed: %r", self.port, exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("amqtt broker thread on port %d did not stop within %.0f s",
                        self.port, timeout_s)
