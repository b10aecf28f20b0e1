"""Model latency on a fixed synthetic input (batch 1 and the evaluation batch)."""

from __future__ import annotations

import statistics
import time

import torch


@torch.inference_mode()
def measure_latency(model: torch.nn.Module, *, device: torch.device, half: bool, imgsz: int, batch: int,
                    iters: int, warmup: int = 2) -> float:
    """Median milliseconds of one forward pass on a fixed synthetic [batch, 3, imgsz, imgsz] input.

    CUDA is timed with events; the CPU with ``perf_counter``.
    """
    dtype = torch.half if half else torch.float
    x = torch.full((batch, 3, imgsz, imgsz), 0.5, device=device, dtype=dtype)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))
