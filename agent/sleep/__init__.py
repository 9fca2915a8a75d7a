"""Sleep: consolidating what the fast memory learned into low-rank adapters on the head.

Modules: `adapters` (AdaptedHead: the bundle's head + A_i, B_i + rows for device
classes), `kernels` (numba training step), `replay` (held-out split, class-balanced
surprise-prioritized replay, pseudo-latents), `consolidate` (the sleep loop behind
`Learner.sleep`), `report` (SleepReport). `consolidate` is imported by `Learner.sleep`
on first use, so importing this package stays light.
"""

from agent.sleep.adapters import AdaptedHead
from agent.sleep.report import SleepReport

__all__ = ["AdaptedHead", "SleepReport"]
