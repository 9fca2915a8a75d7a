"""The fast system: sparse coding, episodic memory, kNN and associative readouts.

Modules: `kernels` (numba, pure functions on arrays), `sparse` (SparseCoder), `episodic`
(EpisodicMemory on hnswlib), `readout` (AssociativeReadout), `config`, `state`, `errors`.
"""

from agent.memory.config import MemoryConfig
from agent.memory.episodic import EpisodicMemory
from agent.memory.errors import MemoryInputError, MemoryStateError
from agent.memory.readout import AssociativeReadout, ReadoutConfig
from agent.memory.sparse import SparseCoder, SparseCoderConfig
from agent.memory.state import Episodes

__all__ = [
    "AssociativeReadout", "EpisodicMemory", "Episodes", "MemoryConfig", "MemoryInputError",
    "MemoryStateError", "ReadoutConfig", "SparseCoder", "SparseCoderConfig",
]
