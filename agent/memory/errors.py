"""Errors of the fast system, in the project's one hierarchy (``agent.errors.ReverieError``).

Both also derive from ``ValueError`` so callers that only know numpy conventions still
catch them. Candidates to move into ``agent/errors.py`` once the lead agrees on names.
"""

from __future__ import annotations

from agent.errors import ReverieError


class MemoryInputError(ReverieError, ValueError):
    """An array or value handed to the fast system has the wrong shape, dtype or range,
    is not finite, or names an episode that is not (or no longer) stored."""


class MemoryStateError(ReverieError, ValueError):
    """Saved memory state (arrays or hnswlib index) is inconsistent with the config or itself."""
