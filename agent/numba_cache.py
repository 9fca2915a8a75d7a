"""A numba kernel cache the service user cannot poison (issue 13, finding 12).

numba's cache holds pickled compiled code: whoever can write it runs code in the agent at
its next start. The install therefore warms the cache (``python -m agent.warmup``) into a
directory the service user can only read (the Dockerfile and `.ci/install-runtime.sh`:
``/opt/reverie/numba-cache``, owned by root). numba, however, uses a cache directory only
if it can write to it (it tests with a temporary file), so at start-up the daemon copies a
read-only ``NUMBA_CACHE_DIR`` into a fresh private directory (0700, removed at exit) and
points numba there: every start begins from the install-time kernels, and anything the
process writes dies with it. A writable ``NUMBA_CACHE_DIR`` (development, tests) is used
as it is.

This must run before any module that compiles kernels is imported: importing this module
does it (`agent.daemon` imports it before anything else of the agent).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile

log = logging.getLogger("reverie.daemon")
_done = False


def use_private_copy_if_read_only(env=os.environ) -> str | None:
    """Copy a read-only ``NUMBA_CACHE_DIR`` to a private temp dir and use that; returns
    the directory numba will use (None: no cache dir configured). Idempotent."""
    global _done
    src = env.get("NUMBA_CACHE_DIR")
    if _done or not src or not os.path.isdir(src) or os.access(src, os.W_OK):
        return src
    _done = True
    dst = tempfile.mkdtemp(prefix="reverie-numba-")     # 0700
    try:
        shutil.copytree(src, dst, dirs_exist_ok=True)
    except OSError as exc:      # an incomplete copy only costs compile time
        log.warning("numba cache %s: copy to %s incomplete (%s)", src, dst, exc)
    # copytree copied the read-only modes: the copy is ours, private and writable
    for root, _dirs, files in os.walk(dst):
        os.chmod(root, 0o700)
        for name in files:
            os.chmod(os.path.join(root, name), 0o600)
    atexit.register(shutil.rmtree, dst, True)
    env["NUMBA_CACHE_DIR"] = dst
    numba_config = sys.modules.get("numba.core.config")
    if numba_config is not None:        # numba already imported: its config read the env
        numba_config.CACHE_DIR = dst
    return dst


# On import, so that importing this module first (agent/daemon.py does) is enough.
use_private_copy_if_read_only()
