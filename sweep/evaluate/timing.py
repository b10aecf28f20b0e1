"""Explicit stage timing. CUDA is synchronised only when the timed device is CUDA."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


def sync(device: torch.device | str | None) -> None:
    """Wait for queued CUDA work on ``device``; a no-op on CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates wall seconds per named stage: ``with sw.stage("inference"): ...``."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def as_metrics(self, prefix: str = "seconds_") -> dict[str, float]:
        return {f"{prefix}{k}": round(v, 6) for k, v in self.seconds.items()}
