"""The systemd notify protocol (sd_notify(3)), stdlib only.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET``: a unix datagram socket, either a
path (``/run/systemd/notify``) or an abstract name (``@name``, i.e. a leading NUL byte).
Each notification is one datagram of newline-separated ``KEY=VALUE`` fields, e.g.
``READY=1\\nSTATUS=listening``. With ``WatchdogSec=`` systemd also passes ``WATCHDOG_USEC``
(and ``WATCHDOG_PID``, the pid it expects pings from); the service must send
``WATCHDOG=1`` more often than that, conventionally every half period.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, so the daemon calls the
notifier unconditionally. Delivery failures never raise: a lost notification must not
take the agent down; the first one is logged as a warning, the rest at debug level. A send
blocks at most ``send_timeout_s`` (a datagram socket whose reader stalls fills its queue,
and an unbounded send would then freeze the loop the watchdog is meant to watch).

>>> n = SystemdNotifier(env={})
>>> n.enabled, n.ready("up"), n.watchdog_interval_s
(False, False, None)
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

from agent.errors import ConfigError

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 1.0


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    # e.g. "vsock:..." (systemd >= 254 in VMs): not something an edge device uses.
    log.warning("NOTIFY_SOCKET=%r is not a unix socket path or @abstract name; "
                "systemd notifications disabled", value)
    return None


def _positive_int(env: Mapping[str, str], key: str) -> int | None:
    raw = env.get(key, "")
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value <= 0:
        raise ConfigError(f"Invalid {key}={raw!r} (expected a positive integer)")
    return value


class SystemdNotifier:
    """Send ``READY=1``, ``STATUS=...``, ``STOPPING=1``, ``WATCHDOG=1`` to systemd.

    ``env`` defaults to the process environment; tests pass their own mapping.
    """

    def __init__(self, env: Mapping[str, str] = os.environ, *,
                 send_timeout_s: float = SEND_TIMEOUT_S):
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.enabled: bool = self._address is not None
        self._watchdog_usec = _positive_int(env, "WATCHDOG_USEC")
        self._watchdog_pid = _positive_int(env, "WATCHDOG_PID")
        self._send_timeout_s = send_timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"KEY=VALUE"`` each) as one datagram; True if it was sent.

        A malformed field (no ``=``, or a newline inside) is a bug in the caller: ValueError.
        Delivery errors are logged and return False.
        """
        for f in fields:
            if not isinstance(f, str) or "=" not in f or "\n" in f:
                raise ValueError(f"Invalid notify field {f!r} (expected KEY=VALUE on one line)")
        if not self.enabled or not fields:
            return False
        data = "\n".join(fields).encode()
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(self._send_timeout_s)
                self._sock.sendto(data, self._address)  # type: ignore[arg-type]
            return True
        except OSError as exc:
            if not self._warned:
                log.warning("systemd notify to %r failed: %s (further failures logged at "
                            "debug level)", self._display_address(), exc)
                self._warned = True
            else:
                log.debug("systemd notify failed: %s", exc)
            return False

    def ready(self, status: str = "") -> bool:
        """Startup finished: systemd marks the unit active (and starts the watchdog clock)."""
        return self.notify("READY=1", *([_status_field(status)] if status else []))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(_status_field(text))

    def watchdog(self) -> bool:
        """Keep-alive ping; call every ``watchdog_interval_s`` from the loop that must be alive."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before a start/stop timeout (e.g. a cold numba JIT cache)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1e6))}")

    @property
    def watchdog_interval_s(self) -> float | None:
        """Half of ``WATCHDOG_USEC`` in seconds, or None when no watchdog applies to us."""
        if self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None  # the watchdog is meant for another process (e.g. our parent)
        return self._watchdog_usec / 2 / 1e6

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _display_address(self) -> str:
        a = self._address
        return "@" + a[1:].decode(errors="replace") if isinstance(a, bytes) else str(a)


def _status_field(text: str) -> str:
    # STATUS is one line; an exception message with newlines would split the datagram.
    return "STATUS=" + " ".join(str(text).splitlines())
