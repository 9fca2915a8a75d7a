"""Errors of the fast system, as subclasses of the project's hierarchy in ``agent/errors.py``.

Callers can catch the general class (``InputError`` for bad inputs, ``StateError`` for
damaged saved state) or these narrower ones; both also derive from ``ValueError``.
"""

from __future__ import annotations

from agent.errors import InputError, StateError


class MemoryInputError(InputError):
    """An array or value handed to the fast system has the wrong shape, dtype or range,
    is not finite, or names an episode that is not (or no longer) stored."""


class MemoryStateError(StateError, ValueError):
    """Saved memory state (arrays or hnswlib index) is inconsistent with the config or itself."""
