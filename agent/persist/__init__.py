"""Crash-safe on-disk state: numbered checkpoints + a write-ahead log (design.md, "On-disk state").

* `CheckpointStore` -- self-verifying numbered checkpoints behind an atomic CURRENT pointer.
* `WriteAheadLog` -- append-only CRC-framed records in segment files; fsync on `durable`.
* `StateDir` -- both together: ``recover()`` -> checkpoint + records after it + warnings.
* `encode_record` / `decode_record` -- a pickle-free payload (JSON meta + raw arrays).

Everything survives kill -9 and power cuts at any instruction; damage is detected by
checksums and reported, never silently loaded. No pickle anywhere.
"""

from agent.persist.checkpoint import CheckpointStore, LoadedCheckpoint
from agent.persist.state import Recovery, StateDir
from agent.persist.wal import LogDamagedError, WriteAheadLog
from agent.persist.wal_format import decode_record, encode_record

__all__ = [
    "CheckpointStore",
    "LoadedCheckpoint",
    "LogDamagedError",
    "Recovery",
    "StateDir",
    "WriteAheadLog",
    "decode_record",
    "encode_record",
]
