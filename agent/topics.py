"""Every MQTT topic string lives here (docs/protocol.md).

Per device, under a configurable prefix (default ``reverie/v1``)::

    {prefix}/{device}/frames       in   sensor frames (JSON or binary)
    {prefix}/{device}/labels       in   labels (QoS 1)
    {prefix}/{device}/cmd          in   commands
    {prefix}/{device}/predictions  out  one message per window
    {prefix}/{device}/events       out  errors with reasons, novelty, sleep reports
    {prefix}/{device}/status       out  retained; "offline" as last will
    {prefix}/{device}/replies      out  replies to commands (MQTT 5: or the response topic)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "reverie/v1"
WILDCARD_DEVICE = "+"

_DEVICE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_PREFIX_RE = re.compile(r"^[^#+\x00]+$")

INBOUND = ("frames", "labels", "cmd")
OUTBOUND = ("predictions", "events", "status", "replies")


def validate_device_id(device: str, *, allow_wildcard: bool = False) -> str:
    """Return `device` if it is a valid device id (letters, digits, ``_.:-``; 1-64 chars)."""
    if allow_wildcard and device == WILDCARD_DEVICE:
        return device
    if not isinstance(device, str) or not _DEVICE_RE.match(device) or device in (".", ".."):
        raise ValueError(
            f"Invalid device id: {device!r} (expected 1-64 characters from [A-Za-z0-9_.:-])"
        )
    return device


@dataclass(frozen=True)
class Topics:
    """Topic names for one device (or ``+`` for all devices under the prefix).

    >>> Topics("dev1").frames
    'reverie/v1/dev1/frames'
    >>> Topics("+").parse("reverie/v1/dev7/frames")
    ('dev7', 'frames')
    """

    device: str
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_device_id(self.device, allow_wildcard=True)
        if not _PREFIX_RE.match(self.prefix) or self.prefix.endswith("/"):
            raise ValueError(
                f"Invalid topic prefix: {self.prefix!r} (no wildcards, no trailing '/')"
            )

    def _t(self, kind: str) -> str:
        return f"{self.prefix}/{self.device}/{kind}"

    @property
    def frames(self) -> str:
        return self._t("frames")

    @property
    def labels(self) -> str:
        return self._t("labels")

    @property
    def cmd(self) -> str:
        return self._t("cmd")

    @property
    def predictions(self) -> str:
        return self._t("predictions")

    @property
    def events(self) -> str:
        return self._t("events")

    @property
    def status(self) -> str:
        return self._t("status")

    @property
    def replies(self) -> str:
        return self._t("replies")

    def for_device(self, device: str) -> Topics:
        """The same prefix, another (concrete) device."""
        return Topics(validate_device_id(device), self.prefix)

    def parse(self, topic: str) -> tuple[str, str]:
        """Split a concrete topic into ``(device, kind)``; ValueError if it is not ours."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise ValueError(f"Invalid topic: {topic!r} (expected prefix {head!r})")
        rest = topic[len(head):].split("/")
        if len(rest) != 2 or rest[1] not in INBOUND + OUTBOUND:
            raise ValueError(f"Invalid topic: {topic!r} (expected {head}<device>/<kind>)")
        device, kind = rest
        validate_device_id(device)
        if self.device != WILDCARD_DEVICE and device != self.device:
            raise ValueError(f"Invalid topic: {topic!r} (expected device {self.device!r})")
        return device, kind
