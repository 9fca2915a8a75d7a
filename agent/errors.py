"""One small error hierarchy. Messages name the bad value and say what was expected."""


class ReverieError(Exception):
    """Base class of every error reverie raises on purpose."""


class ConfigError(ReverieError):
    """A configuration value (flag, file, environment) is invalid."""


class BundleError(ReverieError):
    """A model bundle is missing, malformed, tampered with or unsupported."""


class DatasetError(ReverieError):
    """A dataset file breaks the NPZ dataset format."""


class ProtocolError(ReverieError):
    """A payload on the wire breaks the protocol (docs/protocol.md).

    `reason` is a short stable code (e.g. ``"bad_json"``) used for counters and
    error events; the message says what exactly was wrong.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class BrokerError(ReverieError):
    """The MQTT broker cannot be reached or started."""


class StateError(ReverieError):
    """On-disk state (checkpoint, write-ahead log) cannot be written, or is damaged."""


class InputError(ReverieError, ValueError):
    """An input to a learner (window, label) has the wrong shape, type or values."""
