"""Process setup, done once by the entry point (never inside a job): host-memory policy and MLflow's HTTP client.

``setup_process`` applies both. Host memory: keep freed memory in the process for reuse instead of
handing it back to the OS.

A CPU forward pass at batch 32 allocates activations of tens to hundreds of MB per layer.
glibc's malloc serves every block above its mmap threshold (at most 32 MB) with a fresh
``mmap`` and unmaps it on ``free``, so every pass page-faults all of its activations again:
with as much kernel time in page faults as in compute (docs/benchmarks.md). Serving large blocks
from the heap and never trimming it makes later passes reuse the same pages; the price is that the
process keeps its peak host memory plus some fragmentation.

Only glibc (Linux) has these knobs; elsewhere this does nothing. ``eval.reuse_host_memory``
switches it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h) and glibc's defaults for them
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536


def keep_freed_memory(enabled: bool = True) -> bool:
    """``enabled``: serve large blocks from the heap and never trim it; else glibc's defaults
    (``mallopt``). True when applied.

    Safe to call again. Affects allocations made after the call; blocks that are mapped
    already are unmapped as before when freed.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mmap_max, trim = (0, -1) if enabled else (DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD)  # -1: never trim
        ok = libc.mallopt(M_MMAP_MAX, mmap_max) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim) == 1
    except (OSError, AttributeError) as exc:
        log.debug("mallopt unavailable (%s): host memory is returned to the OS as usual", exc)
        return False
    return bool(ok)


def bound_mlflow_http_retries() -> None:
    """MLflow's HTTP client retries a refused connection for minutes on its own (7 retries, exponential
    backoff): with the tracker's own bounded retries on top, a dropped server would stall a job for a
    quarter of an hour. The tracker is the one retry layer, unless the user set these variables."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def setup_process(reuse_host_memory: bool = True) -> None:
    """Everything process-wide, once, at the entry point (idempotent)."""
    keep_freed_memory(reuse_host_memory)
    bound_mlflow_http_retries()
