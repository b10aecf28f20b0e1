"""Model latency on a fixed synthetic input (batch 1 and the evaluation batch), with its spread.

One median hides a busy machine: every measurement keeps its quartiles and extremes, so the job can
log the spread and warn when it is wide, and ``measure_latency_pair`` times a model and its dense
reference alternately in the same process, so both see the same load and their ratio stays honest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds of one forward pass over ``iters`` timed repetitions."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    iters: int

    @classmethod
    def of(cls, times_ms: list[float]) -> "LatencyStats":
        t = np.asarray(times_ms, dtype=float)
        q1, med, q3 = np.percentile(t, [25, 50, 75])
        return cls(float(med), float(q1), float(q3), float(t.min()), float(t.max()), len(t))

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (about 0.02 on a quiet machine)."""
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms > 0 else float("nan")

    def per_image(self, batch: int) -> "LatencyStats":
        b = float(batch)
        return LatencyStats(self.median_ms / b, self.q1_ms / b, self.q3_ms / b, self.min_ms / b, self.max_ms / b,
                            self.iters)


def _input(device: torch.device, half: bool, imgsz: int, batch: int) -> torch.Tensor:
    return torch.full((batch, 3, imgsz, imgsz), 0.5, device=device, dtype=torch.half if half else torch.float)


def _time_once(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(x)
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    model(x)
    return (time.perf_counter() - t0) * 1e3


@torch.inference_mode()
def measure_latency(model: torch.nn.Module, *, device: torch.device, half: bool, imgsz: int, batch: int,
                    iters: int, warmup: int = 2) -> LatencyStats:
    """Forward-pass milliseconds on a fixed synthetic [batch, 3, imgsz, imgsz] input: median, quartiles,
    extremes over ``iters`` repetitions after ``warmup``. CUDA is timed with events; the CPU with
    ``perf_counter``."""
    x = _input(device, half, imgsz, batch)
    for _ in range(warmup):
        model(x)
    return LatencyStats.of([_time_once(model, x, device) for _ in range(max(1, iters))])


@torch.inference_mode()
def measure_latency_pair(model: torch.nn.Module, dense: torch.nn.Module, *, device: torch.device, half: bool,
                         imgsz: int, batch: int, iters: int, warmup: int = 2) -> tuple[LatencyStats, LatencyStats]:
    """(model, dense) latency timed alternately, one pass of each per repetition, so a load that comes
    and goes hits both alike; their medians' ratio is the speed-up the pruning really gives."""
    x = _input(device, half, imgsz, batch)
    for _ in range(warmup):
        model(x)
        dense(x)
    a, b = [], []
    for i in range(max(1, iters)):
        first, second = (model, dense) if i % 2 == 0 else (dense, model)  # neither always runs warm
        t1 = _time_once(first, x, device)
        t2 = _time_once(second, x, device)
        a.append(t1 if first is model else t2)
        b.append(t2 if first is model else t1)
    return LatencyStats.of(a), LatencyStats.of(b)
