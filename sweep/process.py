"""Keep freed host memory in the process for reuse instead of handing it back to the OS.

A CPU forward pass at batch 32 allocates activations of tens to hundreds of MB per layer.
glibc's malloc serves every block above its mmap threshold (at most 32 MB) with a fresh
``mmap`` and unmaps it on ``free``, so every pass page-faults all of its activations again:
on this project's 2-core machines a pass of yolov5n over coco-val128 took 17 M minor page
faults and as much kernel time as compute. Serving large blocks from the heap and never
trimming it makes later passes reuse the same pages: 14.3 s -> 6.3 s per pass (yolov5n),
37.4 s -> 21.9 s (yolov5m, 64 images), ~94 s -> ~58 s (yolov5x, 32 images). The price is that
the process keeps its peak host memory plus some fragmentation (maxrss 2.2 -> 3.5 GB for
yolov5n, 2.9 -> 4.8 GB for yolov5m, 4.0 -> ~5.1 GB for yolov5x; flat over repeated passes).

Only glibc (Linux) has these knobs; elsewhere this does nothing. ``eval.reuse_host_memory``
switches it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
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
