"""The inference loop's helpers (sweep.evaluate.loop)."""

from __future__ import annotations

import gc

import pytest
import torch

from sweep.evaluate.loop import gc_paused, nms_threads


def test_gc_paused_disables_the_collector_and_restores_its_state_also_on_error():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with gc_paused():
            raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a collector the caller disabled stays disabled
    finally:
        gc.enable()


def test_nms_runs_on_all_intra_op_threads_on_the_cpu_and_serially_on_cuda():
    assert nms_threads(torch.device("cpu")) == torch.get_num_threads()
    assert nms_threads(torch.device("cuda", 0)) == 1
