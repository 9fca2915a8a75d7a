"""Start-up checks of `reverie run` (issue 13, findings 11 and 12): the state root, the
per-install client id, anti-rollback of bundles, and a warning for every insecure default.

* The state root is created 0700 (and tightened to 0700 if it exists looser): the learned
  data is the user's data.
* ``install_id`` (8 random hex digits, created once, in the state directory) makes the
  default client id ``reverie-{agent}-{install_id}``: another client cannot take over the
  agent's persistent session (and its queued labels) by guessing a name derived from the
  agent id alone. An explicit ``broker.client_id`` is used as given.
* Anti-rollback: ``bundle_high_water.json`` in the state directory records the newest
  bundle (manifest ``created``) this state ever ran; an older bundle is refused with one
  line, unless ``agent.allow_bundle_rollback`` is set -- an old bundle signed with the same
  key may have a known flaw.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import stat
from datetime import UTC, datetime
from pathlib import Path

from agent.bundle import Bundle
from agent.config import AgentConfig
from agent.errors import BundleError, ConfigError, StateError
from agent.persist import fsio

log = logging.getLogger("reverie.daemon")
INSTALL_ID = "install_id"
HIGH_WATER = "bundle_high_water.json"
OWN_FILES = (INSTALL_ID, HIGH_WATER)   # written before the learners: not "state" yet


def prepare_state_root(path: Path) -> None:
    """Create the state root 0700 (parents too), or tighten an existing one to 0700."""
    try:
        if path.is_dir():
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                os.chmod(path, fsio.DIR_MODE)
                log.warning("agent.state_dir %s was mode %o: set to 0700 (owner only)", path, mode)
        else:
            fsio.makedirs_private(path)
    except OSError as exc:
        raise ConfigError(f"agent.state_dir={str(path)!r}: {exc.strerror or exc}") from None


def install_id(state_dir: Path) -> str:
    """This installation's random id (created on first use, kept in the state dir)."""
    path = state_dir / INSTALL_ID
    try:
        text = path.read_text("ascii").strip()
        if len(text) == 8 and all(c in "0123456789abcdef" for c in text):
            return text
        log.warning("%s: unreadable install id %r replaced", path, text[:20])
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("%s: cannot read the install id (%s): a new one is made", path, exc)
    value = secrets.token_hex(4)
    fsio.replace_atomically(path, f"{value}\n".encode())
    return value


def client_id(config: AgentConfig) -> str:
    """The MQTT client id: ``broker.client_id``, else ``reverie-{agent}-{install id}`` with
    a state directory, else ``reverie-{agent}`` (no state: nothing durable to protect)."""
    if config.broker.client_id:
        return config.broker.client_id
    if config.state_dir is None:
        return config.client_id
    return f"{config.client_id}-{install_id(config.state_dir)}"


def _created(bundle: Bundle) -> datetime | None:
    raw = bundle.manifest.get("created")
    if not isinstance(raw, str):
        return None
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def check_rollback(state_dir: Path, bundle: Bundle, *, allow: bool) -> None:
    """Refuse a bundle older than the newest this state directory ran; record a newer one.

    Raises BundleError (one line, naming both bundles and the override)."""
    path = state_dir / HIGH_WATER
    created = _created(bundle)
    mark = None
    try:
        mark = json.loads(path.read_text("utf-8"))
        mark_created = datetime.fromisoformat(mark["created"])
    except FileNotFoundError:
        mark = None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{path}: unreadable bundle high-water mark ({exc}): remove it only "
                         "if no older bundle can be deployed here") from None
    if mark is not None:
        older = created is None or created < mark_created
        if older and not allow:
            what = "has no valid 'created' time" if created is None else \
                f"was created {created.isoformat()}"
            raise BundleError(
                f"{bundle.path}: bundle {bundle.bundle_id} {what}, older than bundle "
                f"{mark.get('bundle_id')} ({mark['created']}) that this state directory "
                f"ran: refusing a rollback (set agent.allow_bundle_rollback = true, "
                f"REVERIE_AGENT_ALLOW_BUNDLE_ROLLBACK=1, to run it anyway)")
        if older:
            log.warning("running bundle %s, older than bundle %s that this state directory "
                        "ran (agent.allow_bundle_rollback = true)", bundle.bundle_id,
                        mark.get("bundle_id"))
            return
        if created == mark_created:
            return
    if created is None:
        log.warning("bundle %s has no valid 'created' time: anti-rollback cannot protect "
                    "this state directory", bundle.bundle_id)
        return
    fsio.replace_atomically(path, json.dumps(
        {"created": created.isoformat(), "bundle_id": bundle.bundle_id,
         "name": bundle.manifest.get("name")}).encode())


def _loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def insecure_defaults(config: AgentConfig, bundle: Bundle, *, command_key: bool) -> list[str]:
    """One line per insecure setting in effect (logged as warnings at start-up)."""
    out = []
    if not config.public_keys:
        out.append(f"bundle {bundle.bundle_id} is not signature-checked: no agent.public_keys "
                   "(--public-key), so any bundle with matching hashes runs")
    if config.commands_from == "any" and not command_key:
        out.append("commands.from = \"any\" without commands.key_file: any device can "
                   "send state-changing commands (sleep, snapshot, rollback)")
    url = config.broker.url
    if not _loopback(url.host):
        if not url.tls:
            out.append(f"broker {url.host}:{url.port} is not on this host and the connection "
                       "is not encrypted (use mqtts:// with broker.ca_file)")
        if not url.password and not config.broker.tls.cert_file:
            out.append(f"broker {url.host}:{url.port}: no password and no client certificate "
                       "(set broker.username and broker.password_file, or broker.cert_file)")
    if url.password and _on_command_line(url.password):
        out.append("the broker password is on the command line (--broker URL), where `ps` "
                   "shows it to every user: use broker.password_file")
    return out


def _on_command_line(secret: str) -> bool:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return secret.encode() in f.read()
    except OSError:
        return False
