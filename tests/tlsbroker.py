"""A real mosquitto with TLS, mutual-TLS, password and ACL listeners, for tests.

`make_pki` writes a throwaway PKI (ECDSA P-256, valid for a day): a CA, a server
certificate for ``localhost`` and ``127.0.0.1`` and a client certificate, both signed by
the CA, and a "rogue" CA with its own client certificate that the broker does not trust.
`Pki.issue_client_cert` issues more client certificates, one per common name (e.g. a
device id), from either CA. `SecureMosquitto` starts one mosquitto with four loopback listeners:

- ``url_tls``: TLS, no client certificate needed, anonymous clients allowed;
- ``url_mtls``: TLS that requires a client certificate signed by the CA; the
  certificate's common name becomes the MQTT username;
- ``url_password``: plain MQTT, ``allow_anonymous false``, one user in a password file
  made with ``mosquitto_passwd`` (None when that tool is missing);
- ``url_acl``: mutual TLS as ``url_mtls``, plus an ``acl_file`` (default `ACL`): the agent
  (CN `AGENT_CN`) reads every device's inbound topics and writes the outbound ones, an
  operator (CN `OPERATOR_CN`) commands the gateway, and each device (CN = device id) may
  only publish its own frames and labels and read its own predictions and events
  (``pattern ... %u``). Denied publications are dropped by the broker (MQTT 5 QoS 1: a
  PUBACK saying "Not authorized"). mosquitto's acl_file grants every SUBSCRIBE and applies
  the ``read`` rules to each message at delivery.

Tests use the session fixture `secure_broker`; make it visible in the test module:

>>> from tests import tlsbroker                                  # doctest: +SKIP
>>> secure_broker = tlsbroker.secure_broker                      # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.errors import BrokerError, ConfigError
from agent.mqtt import TLSConfig
from agent.topics import DEFAULT_PREFIX
from firmware_sim.broker import accepts, find_binary, find_mosquitto, free_port

HOST = "127.0.0.1"
CLIENT_CN = "reverie-test-device"
USERNAME = "reverie-user"
PASSWORD = "s3cret pass:word"  # a space and a colon: exercises URL quoting
AGENT_CN = "reverie-agent"
OPERATOR_CN = "operator"
MODES = ("tls", "mtls", "password", "acl")
BROKER_ENV = "REVERIE_TEST_BROKER"
_PASSWD_CANDIDATES = ("/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd",
                      "/usr/local/bin/mosquitto_passwd")
_PORT_ATTEMPTS = 5
_CN_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")   # a device id: also safe as a file name

# Topic access on the "acl" listener. mosquitto checks `user` blocks for that user and
# `pattern` lines for everyone, %u being the MQTT user name: the certificate's common name
# (use_identity_as_username). Whatever is not granted is denied.
ACL = f"""\
# The agent in gateway mode: every device's inbound topics, every device's outbound ones.
user {AGENT_CN}
topic read {DEFAULT_PREFIX}/+/frames
topic read {DEFAULT_PREFIX}/+/labels
topic read {DEFAULT_PREFIX}/+/cmd
topic write {DEFAULT_PREFIX}/+/predictions
topic write {DEFAULT_PREFIX}/+/events
topic write {DEFAULT_PREFIX}/+/status
topic write {DEFAULT_PREFIX}/+/replies

# Operators command the agent on its own topic and read its replies and every status.
user {OPERATOR_CN}
topic write {DEFAULT_PREFIX}/gateway/cmd
topic read {DEFAULT_PREFIX}/gateway/replies
topic read {DEFAULT_PREFIX}/+/status

# Each device (certificate CN = device id): its own topics only.
pattern write {DEFAULT_PREFIX}/%u/frames
pattern write {DEFAULT_PREFIX}/%u/labels
pattern read {DEFAULT_PREFIX}/%u/predictions
pattern read {DEFAULT_PREFIX}/%u/events
"""


# -- PKI ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files `make_pki` wrote (keys are unencrypted)."""

    dir: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca_cert: Path
    rogue_client_cert: Path
    rogue_client_key: Path
    ca_key: Path
    rogue_ca_key: Path

    def tls(self, *, client: bool = False, rogue_ca: bool = False,
            rogue_client: bool = False, cn: str | None = None) -> TLSConfig:
        """Client TLS settings: trust the CA (or the rogue CA), optionally with a client
        certificate (the trusted one, or the rogue one; for common name `cn` if given)."""
        ca = self.rogue_ca_cert if rogue_ca else self.ca_cert
        if cn is not None:
            return TLSConfig(ca, *self.issue_client_cert(cn, rogue=rogue_client))
        if rogue_client:
            return TLSConfig(ca, self.rogue_client_cert, self.rogue_client_key)
        if client:
            return TLSConfig(ca, self.client_cert, self.client_key)
        return TLSConfig(ca)

    def issue_client_cert(self, cn: str, *, rogue: bool = False) -> tuple[Path, Path]:
        """``(certificate, key)`` of a client whose common name is `cn`, signed by the CA
        (or by the rogue CA); issued on first use, reused after.

        >>> cert, key = make_pki(tmp_path).issue_client_cert("sensor-7")    # doctest: +SKIP
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        if not isinstance(cn, str) or not _CN_RE.match(cn) or cn in (".", ".."):
            raise ConfigError(f"Invalid client certificate common name: {cn!r} (expected "
                              "1-64 characters from [A-Za-z0-9_.:-], like a device id)")
        stem = self.dir / f"{'rogue-' if rogue else ''}client-{cn}"
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        if cert_path.is_file() and key_path.is_file():
            return cert_path, key_path
        ca_cert, ca_key = ((self.rogue_ca_cert, self.rogue_ca_key) if rogue
                           else (self.ca_cert, self.ca_key))
        issuer = x509.load_pem_x509_certificate(ca_cert.read_bytes())
        issuer_key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(x509, cn, key, issuer, issuer_key, kind="client")
        _write_key(key_path, key)
        cert_path.write_bytes(_cert_pem(cert))
        return cert_path, key_path


def make_pki(directory: str | os.PathLike) -> Pki:
    """Write a CA, server and client certificates and a rogue CA + client into `directory`."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue(x509, "reverie test CA", ca_key, None, ca_key, kind="ca")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(x509, "localhost", server_key, ca, ca_key, kind="server")
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue(x509, CLIENT_CN, client_key, ca, ca_key, kind="client")
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = _issue(x509, "rogue CA", rogue_ca_key, None, rogue_ca_key, kind="ca")
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _issue(x509, CLIENT_CN, rogue_key, rogue_ca, rogue_ca_key, kind="client")

    pki = Pki(d, d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
              d / "client.key", d / "rogue-ca.crt", d / "rogue-client.crt", d / "rogue-client.key",
              d / "ca.key", d / "rogue-ca.key")
    for path, cert in ((pki.ca_cert, ca), (pki.server_cert, server), (pki.client_cert, client),
                       (pki.rogue_ca_cert, rogue_ca), (pki.rogue_client_cert, rogue)):
        path.write_bytes(_cert_pem(cert))
    for path, key in ((pki.server_key, server_key), (pki.client_key, client_key),
                      (pki.rogue_client_key, rogue_key), (pki.ca_key, ca_key),
                      (pki.rogue_ca_key, rogue_ca_key)):
        _write_key(path, key)
    return pki


def _issue(x509, common_name: str, key, issuer, issuer_key, *, kind: str):
    """One certificate for `key`, signed by `issuer_key` (self-signed when issuer is None).

    Extensions follow RFC 5280 closely enough for OpenSSL's X509_STRICT checks (CA key
    usage, key identifiers), which newer Pythons turn on by default.
    """
    import ipaddress

    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    is_ca = kind == "ca"
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A minute back: the broker's clock and ours are the same, but be lenient.
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=not is_ca, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=is_ca,
            crl_sign=is_ca, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    )
    if kind == "server":
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif kind == "client":
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _write_key(path: Path, key) -> None:
    """An unencrypted PKCS#8 PEM, owner-only from the start."""
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    path.chmod(0o600)


def credentials_url(port: int, username: str, password: str | None = None) -> str:
    """``mqtt://USER[:PASSWORD]@127.0.0.1:PORT``, credentials percent-encoded.

    >>> credentials_url(1883, "a b", "p:w")
    'mqtt://a%20b:p%3Aw@127.0.0.1:1883'
    """
    from urllib.parse import quote

    cred = quote(username, safe="")
    if password is not None:
        cred += ":" + quote(password, safe="")
    return f"mqtt://{cred}@{HOST}:{port}"


# -- broker ---------------------------------------------------------------------------
def find_mosquitto_passwd() -> str | None:
    """Path of the mosquitto_passwd tool, or None when there is none."""
    return find_binary("mosquitto_passwd", _PASSWD_CANDIDATES)


class SecureMosquitto:
    """A mosquitto subprocess with TLS, mutual-TLS, password and ACL listeners on 127.0.0.1.

    `modes`: the listeners to open, a subset of `MODES`. "password" is dropped (with
    `password_unavailable` saying why) when no mosquitto_passwd exists. `acl`: the text of
    the "acl" listener's acl_file. The config, the password and ACL files and the log live
    in `workdir` and are kept.

    >>> with SecureMosquitto(tmp_path, make_pki(tmp_path / "pki")) as b:   # doctest: +SKIP
    ...     client = make_client(BrokerURL.parse(b.url_tls), tls=b.pki.tls())
    """

    def __init__(self, workdir: str | os.PathLike, pki: Pki, *, modes: tuple[str, ...] = MODES,
                 acl: str = ACL, start_timeout_s: float = 10.0):
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise ConfigError(f"Invalid SecureMosquitto modes: {modes!r} (expected a "
                              f"non-empty subset of {MODES})")
        self.workdir = Path(workdir)
        self.pki = pki
        self.start_timeout_s = start_timeout_s
        self.password_unavailable: str | None = None
        self.modes = tuple(modes)
        if "password" in self.modes and find_mosquitto_passwd() is None:
            self.password_unavailable = ("no mosquitto_passwd binary (searched PATH and "
                                         f"{', '.join(_PASSWD_CANDIDATES)})")
            self.modes = tuple(m for m in self.modes if m != "password")
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.out_path = self.workdir / "mosquitto.out"
        self.passwd_path = self.workdir / "passwd"
        self.acl = acl
        self.acl_path = self.workdir / "acl"
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen | None = None

    # -- URLs -------------------------------------------------------------------------
    @property
    def url_tls(self) -> str:
        return f"mqtts://{HOST}:{self._port('tls')}"

    @property
    def url_mtls(self) -> str:
        return f"mqtts://{HOST}:{self._port('mtls')}"

    @property
    def url_acl(self) -> str:
        return f"mqtts://{HOST}:{self._port('acl')}"

    @property
    def url_password(self) -> str:
        """``mqtt://USER:PASSWORD@127.0.0.1:PORT`` with the right credentials."""
        return self.password_url(USERNAME, PASSWORD)

    @property
    def url_password_anonymous(self) -> str:
        return f"mqtt://{HOST}:{self._port('password')}"

    def password_url(self, username: str, password: str | None = None) -> str:
        """A URL for the password listener with any credentials."""
        return credentials_url(self._port("password"), username, password)

    def _port(self, mode: str) -> int:
        if mode not in self.ports:
            why = f": {self.password_unavailable}" if mode == "password" else ""
            raise BrokerError(f"SecureMosquitto has no running {mode!r} listener{why}")
        return self.ports[mode]

    # -- lifecycle --------------------------------------------------------------------
    def config_text(self) -> str:
        pki = self.pki
        lines = [
            "per_listener_settings true",
            "max_queued_messages 100000",
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type error", "log_type warning", "log_type notice",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            # As root mosquitto drops to user `mosquitto`, which cannot read our 0700
            # workdir (see firmware_sim/broker.py): stay root.
            lines.insert(0, "user root")
        tls_files = [f"cafile {pki.ca_cert}", f"certfile {pki.server_cert}",
                     f"keyfile {pki.server_key}"]
        if "tls" in self.ports:
            lines += ["", f"listener {self.ports['tls']} {HOST}", "allow_anonymous true",
                      *tls_files, "require_certificate false"]
        if "mtls" in self.ports:
            # The certificate is the credential: no password check on this listener.
            lines += ["", f"listener {self.ports['mtls']} {HOST}", "allow_anonymous false",
                      *tls_files, "require_certificate true", "use_identity_as_username true"]
        if "password" in self.ports:
            lines += ["", f"listener {self.ports['password']} {HOST}", "allow_anonymous false",
                      f"password_file {self.passwd_path}"]
        if "acl" in self.ports:
            lines += ["", f"listener {self.ports['acl']} {HOST}", "allow_anonymous false",
                      *tls_files, "require_certificate true", "use_identity_as_username true",
                      f"acl_file {self.acl_path}"]
        return "\n".join(lines) + "\n"

    def start(self) -> SecureMosquitto:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError("No mosquitto binary found")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if "password" in self.modes:
            self._write_password_file()
        if "acl" in self.modes:
            self.acl_path.write_text(self.acl)
        for attempt in range(_PORT_ATTEMPTS):
            self.ports = _distinct_free_ports(self.modes)
            try:
                self._start_once(binary)
                return self
            except BrokerError as exc:
                if "Address already in use" not in str(exc) or attempt == _PORT_ATTEMPTS - 1:
                    self.ports = {}
                    raise
        raise AssertionError("unreachable")

    def _write_password_file(self) -> None:
        tool = find_mosquitto_passwd()
        self.passwd_path.unlink(missing_ok=True)
        done = subprocess.run([tool, "-b", "-c", str(self.passwd_path), USERNAME, PASSWORD],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0 or not self.passwd_path.is_file():
            raise BrokerError(f"{tool} -b -c {self.passwd_path} failed with code "
                              f"{done.returncode}: {(done.stdout + done.stderr).strip()}")
        self.passwd_path.chmod(0o600)

    def _start_once(self, binary: str) -> None:
        self.conf_path.write_text(self.config_text())
        self.log_path.write_text("")  # a fresh log per attempt: errors in it are ours
        with open(self.out_path, "wb") as out:
            self._proc = subprocess.Popen([binary, "-c", str(self.conf_path)],
                                          stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and self._proc.poll() is None:
            if all(accepts(port) for port in self.ports.values()):
                return
            time.sleep(0.02)
        code = self._proc.poll()
        self.stop()
        state = (f"exited with code {code}" if code is not None
                 else f"not listening after {self.start_timeout_s} s")
        raise BrokerError(f"secure mosquitto on {HOST} ports {self.ports} {state}; "
                          f"config {self.conf_path}; log tail:\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, n_lines: int = 30) -> str:
        text = ""
        for path in (self.out_path, self.log_path):
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        return "\n".join(text.strip().splitlines()[-n_lines:]) or "(empty)"

    def log_size(self) -> int:
        """Bytes in the log now: pass as `since` to `wait_for_log` to see only what follows."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def wait_for_log(self, needle: str, *, since: int = 0, timeout_s: float = 5.0) -> str:
        """Wait until `needle` appears in the log after byte `since`; return that part.

        AssertionError with the log tail when it does not (mosquitto flushes its log per
        line, but asynchronously to our clients).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
            if needle in text:
                return text
            if time.monotonic() >= deadline:
                raise AssertionError(f"{needle!r} not in the mosquitto log within {timeout_s} s; "
                                     f"log since byte {since}:\n{text[-3000:] or '(empty)'}")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)

    def __enter__(self) -> SecureMosquitto:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SecureMosquitto(ports={self.ports}, log={self.log_path})"


def _distinct_free_ports(modes: tuple[str, ...]) -> dict[str, int]:
    ports: dict[str, int] = {}
    while len(ports) < len(modes):
        port = free_port()
        if port not in ports.values():
            ports[modes[len(ports)]] = port
    return ports


# -- fixture --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def secure_broker(tmp_path_factory):
    """One SecureMosquitto for the session (shared: use unique topics).

    Skips when no mosquitto exists, unless ``REVERIE_TEST_BROKER=mosquitto`` (CI), where
    a missing broker is a failure.
    """
    required = os.environ.get(BROKER_ENV, "").strip().lower() == "mosquitto"
    if find_mosquitto() is None:
        msg = "no mosquitto binary: TLS and password listeners need a real mosquitto"
        if required:
            pytest.fail(f"{msg} ({BROKER_ENV}=mosquitto)")
        pytest.skip(msg)
    root = tmp_path_factory.mktemp("secure-broker")
    broker = SecureMosquitto(root / "broker", make_pki(root / "pki"))
    with broker:
        yield broker
