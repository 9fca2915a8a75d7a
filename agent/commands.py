"""Commands (``{prefix}/{device}/cmd``): authorize, deduplicate, run, reply.

Order matters (issue 13, finding 5): a command is *authorized first* (topic rule, and with
``commands.key_file`` an HMAC over the topic, the agent id and the body with its ``ts``
and ``nonce``, ``ts`` within ``commands.max_age_s``); only then is the duplicate cache
consulted (a QoS 1 redelivery, byte for byte the same payload on the same topic, is
answered from it and not run again); then the nonce is claimed in the persistent
`NonceStore` (a replay -- even on another topic, after a restart or after the cache was
flushed -- is refused); then it runs. So an unauthorized message can neither squat an id
nor push a real command's reply out of the cache, and a signed command runs at most once.

Replies go only to ``{prefix}/{device}/replies`` of the topic the command came in on; an
MQTT 5 ResponseTopic is honoured only when it is that very topic (then with its
CorrelationData): the agent never publishes where a sender tells it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import TYPE_CHECKING

from agent.errors import InputError, ProtocolError, ReverieError
from agent.messages import CommandMsg, decode_command, encode_reply, signed_message
from agent.persist.nonces import NonceStore

if TYPE_CHECKING:
    from agent.worker import Inbound

log = logging.getLogger("reverie.worker")
MAX_COMMAND_BYTES = 4096  # commands are small; a larger one is refused before parsing
MAX_REPLIES = 256         # command replies remembered to answer a redelivery without re-running


class NotAuthorized(ReverieError):
    """A state-changing command refused by the topic rule or the signature check."""


class CommandAuth:
    """The rules of docs/protocol.md, "Who may change state"."""

    def __init__(self, *, key: bytes | None, commands_from: str, own_cmd_topic: str,
                 agent: str, max_age_s: float, nonces: NonceStore):
        self.key = key
        self.commands_from = commands_from
        self.own_cmd_topic = own_cmd_topic
        self.agent = agent
        self.max_age_s = max_age_s
        self.nonces = nonces

    def verify(self, topic: str, cmd: CommandMsg) -> None:
        """Raise NotAuthorized unless `cmd` may run when published on `topic`; the nonce
        is checked by `claim`, after the duplicate cache had its chance to recognise a
        redelivery."""
        if not cmd.changes_state:
            return
        if self.commands_from == "agent" and topic != self.own_cmd_topic:
            raise NotAuthorized(f"{cmd.cmd!r} is accepted only on the agent's own topic "
                                f"{self.own_cmd_topic} (commands.from = \"agent\")")
        if self.key is None:
            return
        if cmd.sig is None or cmd.ts is None or cmd.nonce is None:
            raise NotAuthorized(f"{cmd.cmd!r} must be signed: ts, nonce and sig "
                                "(commands.key_file is set)")
        want = hmac.new(self.key, signed_message(cmd.body, topic=topic, agent=self.agent),
                        "sha256").hexdigest()
        if not hmac.compare_digest(want, cmd.sig):
            raise NotAuthorized(f"{cmd.cmd!r}: bad signature (it covers the topic {topic}, "
                                f"the agent id {self.agent!r} and the body)")
        age = time.time() - cmd.ts
        if abs(age) > self.max_age_s:
            raise NotAuthorized(f"{cmd.cmd!r}: ts is {age:.0f} s off the agent's clock "
                                f"(commands.max_age_s = {self.max_age_s:g})")

    def claim(self, cmd: CommandMsg) -> None:
        """Record a verified signed command's nonce before it runs (durably)."""
        if self.key is None or not cmd.changes_state:
            return
        # Remembered until no copy could be fresh any more, whatever its ts says.
        expires = max(cmd.ts, time.time()) + 2 * self.max_age_s
        if not self.nonces.claim(cmd.nonce, expires=expires):
            raise NotAuthorized(f"{cmd.cmd!r}: nonce {cmd.nonce!r} was used before (a "
                                "replayed command)")


class Commands:
    """Handles one command message at a time (the worker thread)."""

    def __init__(self, daemon, auth: CommandAuth):
        self.d = daemon
        self.auth = auth
        self.replies: dict[tuple[str, bytes], tuple[bool, dict]] = {}

    def process(self, msg: Inbound) -> None:
        d = self.d
        try:
            msg.refuse_oversized("command", MAX_COMMAND_BYTES)
            cmd = decode_command(msg.payload, max_bytes=MAX_COMMAND_BYTES)
        except ProtocolError as exc:
            d.worker.reject(msg, exc.reason, str(exc))
            self.reply(msg, CommandMsg("", "?"), False, error=str(exc), reason=exc.reason)
            d.ack(msg)
            return
        try:
            self.auth.verify(msg.topic, cmd)
        except NotAuthorized as exc:
            self._refuse(msg, cmd, str(exc))
            return
        key = (msg.topic, hashlib.sha256(bytes(msg.payload)).digest())
        if cmd.id and key in self.replies:   # a redelivery: answer again, do not re-run
            ok, result = self.replies[key]
            self.reply(msg, cmd, ok, duplicate=True, **result)
            d.ack(msg)
            return
        try:
            self.auth.claim(cmd)
        except NotAuthorized as exc:
            self._refuse(msg, cmd, str(exc))
            return
        except ReverieError as exc:          # the nonce store is full or cannot be written
            self._refuse(msg, cmd, f"{cmd.cmd!r} refused: {exc}")
            return
        try:
            ok, result = True, self._run(msg.device, cmd)
        except (ReverieError, OSError, ValueError, OverflowError) as exc:
            ok, result = False, {"error": str(exc)}
        if cmd.id:
            self.replies[key] = (ok, result)
            while len(self.replies) > MAX_REPLIES:
                self.replies.pop(next(iter(self.replies)))
        self.reply(msg, cmd, ok, **result)
        d.ack(msg)

    def _refuse(self, msg: Inbound, cmd: CommandMsg, why: str) -> None:
        self.d.worker.reject(msg, "not_authorized", why)
        self.reply(msg, cmd, False, error=why, reason="not_authorized")
        self.d.ack(msg)

    def _run(self, device: str, cmd: CommandMsg) -> dict:
        d = self.d
        if cmd.cmd == "status":
            return {"status": d.status_body("online")}
        if cmd.cmd == "sleep":
            if d.encoder is None:
                raise InputError("this bundle cannot learn, so it cannot sleep")
            if d.sleeper.sleeping:
                return {"scheduled": False, "sleeping": True}
            if not d.config.sleep.enabled:
                raise InputError("sleep.enabled = false: sleeps are turned off")
            d.scheduler.request("command")
            d.sleep_budget_override = cmd.budget_s
            return {"scheduled": True, "sleeping": False}
        if cmd.cmd == "snapshot":
            return {"checkpoints": d.checkpoint_all()}
        if cmd.cmd == "rollback":
            if d.encoder is None:
                raise InputError("this bundle has no adapters to roll back")
            learner = d.learner_for(device)
            version = learner.rollback_adapter(cmd.to_version)
            d.status_changed()
            return {"adapter_version": version}
        raise InputError(f"unknown command {cmd.cmd!r}")

    def reply(self, msg: Inbound, cmd: CommandMsg, ok: bool, **result) -> None:
        d = self.d
        topic = d.topics.for_device(msg.device).replies
        props = msg.properties
        asked = getattr(props, "ResponseTopic", None) if props is not None else None
        out_props = None
        if asked == topic:                  # only ever our own replies topic
            corr = getattr(props, "CorrelationData", None)
            if corr is not None:
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                out_props = Properties(PacketTypes.PUBLISH)
                out_props.CorrelationData = corr
        elif asked:
            log.info("command on %s: ignoring ResponseTopic %r (replies go to %s only)",
                     msg.topic, str(asked)[:200], topic)
        d.outbox.publish(topic, encode_reply(id=cmd.id, cmd=cmd.cmd, ok=ok, ts=time.time(),
                                             **result), qos=1, properties=out_props)
