"""Host memory reuse: large CPU tensors stop page-faulting once freed memory is kept."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from sweep.process import keep_freed_memory

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's (Linux) only")

# Runs in its own process: the allocator settings are process-wide.
PROBE = r"""
import json, resource, torch
from sweep.process import keep_freed_memory

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 16, 3, padding=1))
x = torch.rand(8, 3, 320, 320)  # activations of 52 MB each: above glibc's largest mmap threshold (32 MB)

@torch.inference_mode()
def faults(n=4):
    for _ in range(3):  # warm-up: the first passes take fresh pages either way
        net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        net(x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

out = {"system": faults()}
out["applied"] = keep_freed_memory(True)
out["kept"] = faults()
out["restored"] = keep_freed_memory(False)
out["system_again"] = faults()
print(json.dumps(out))
"""


def test_kept_memory_stops_large_tensors_from_page_faulting_and_can_be_switched_back():
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["applied"] and out["restored"]
    pages = 4 * 2 * (8 * 16 * 320 * 320 * 4) // 4096  # 4 passes x 2 activations above 32 MB
    assert out["system"] > 0.9 * pages        # glibc maps and unmaps each block: every page faults each pass
    assert out["kept"] < 0.1 * out["system"]  # the heap's pages are reused: (almost) no faults
    assert out["system_again"] > 0.9 * pages  # back to glibc's defaults


def test_calling_it_twice_is_harmless():
    assert keep_freed_memory(True) is True
    assert keep_freed_memory(True) is True
    assert keep_freed_memory(False) is True
