"""The HTTP endpoint: ``/metrics`` and ``/healthz`` from a ThreadingHTTPServer on a daemon
thread, without per-request logging."""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from agent.errors import ConfigError
from agent.metrics.registry import CONTENT_TYPE, Registry

log = logging.getLogger("agent.metrics")  # the package name, as before the split


def parse_listen(listen: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[V6ADDR]:PORT"`` -> (host, port); ConfigError names a bad value."""
    host, sep, port_s = listen.rpartition(":") if isinstance(listen, str) else ("", "", "")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_s.isdigit() or int(port_s) > 65535:
        raise ConfigError(f"Invalid metrics listen address: {listen!r} "
                          "(expected HOST:PORT, e.g. 127.0.0.1:9464; port 0 picks a free one)")
    return host, int(port_s)


class _Handler(BaseHTTPRequestHandler):
    registry: Registry  # set on the per-server subclass
    timeout = 10  # a stalled client frees its thread instead of holding it forever

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                self._reply(200, self.registry.render(), CONTENT_TYPE)
            except Exception:
                log.exception("rendering /metrics failed")
                self._reply(500, b"metrics rendering failed\n", "text/plain; charset=utf-8")
        elif path == "/healthz":
            self._reply(200, b"ok\n", "text/plain; charset=utf-8")
        else:
            self._reply(404, b"not found\n", "text/plain; charset=utf-8")

    def _reply(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass  # quiet: a scrape every 15 s must not fill the journal


class MetricsServer:
    """Serve ``registry`` at ``http://HOST:PORT/metrics`` from a daemon thread.

    >>> srv = MetricsServer(Registry(), "127.0.0.1:0"); srv.start()
    >>> srv.address[1] > 0
    True
    >>> srv.stop()
    """

    def __init__(self, registry: Registry, listen: str):
        self.registry = registry
        self.listen = listen
        self._host, self._port = parse_listen(listen)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("MetricsServer already started")
        handler = type("MetricsHandler", (_Handler,), {"registry": self.registry})
        server_cls = type("MetricsHTTPServer", (ThreadingHTTPServer,), {
            "daemon_threads": True,
            "address_family": _family(self._host),
        })
        try:
            self._server = server_cls((self._host, self._port), handler)
        except OSError as exc:
            raise ConfigError(f"Cannot serve metrics on {self.listen!r}: {exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.5},
                                        name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("MetricsServer is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
