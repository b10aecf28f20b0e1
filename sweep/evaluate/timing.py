"""Explicit stage timing. CUDA is synchronised only when the timed device is CUDA (:class:`StageClock`: once per loop)."""

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


class StageClock:
    """Per-stage seconds of a loop without a synchronisation per stage: on the CPU wall time between
    :meth:`mark` calls; on CUDA the time between CUDA events recorded on the current stream (the GPU's own
    clock, read once by :meth:`totals` after one synchronisation at the end)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._spans: list[tuple[str, object, object]] = []
        self._seconds: dict[str, float] = {}

    def mark(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, name: str, start: object, end: object) -> None:
        if self.cuda:
            self._spans.append((name, start, end))
        else:
            self._seconds[name] = self._seconds.get(name, 0.0) + float(end) - float(start)  # type: ignore[arg-type]

    def totals(self) -> dict[str, float]:
        if self.cuda and self._spans:
            torch.cuda.synchronize(self.device)
            for name, start, end in self._spans:
                self._seconds[name] = self._seconds.get(name, 0.0) + start.elapsed_time(end) / 1e3  # type: ignore[attr-defined]
            self._spans = []
        return dict(self._seconds)
