"""Where the time goes: a per-layer time breakdown of one forward pass from torch.profiler.

Each top-level layer of the YOLOv5 ``nn.Sequential`` (``model.0`` ... ``model.24``) is wrapped in a
``torch.profiler.record_function`` range by forward hooks, so the profiler's own accounting (CPU
time, and device time on CUDA) is attributed to layers without changing the model.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

_PREFIX = "layer."


def _label(i: int, module: nn.Module) -> str:
    return f"{_PREFIX}{i:03d}.{type(module).__name__}"


def _time_column(device: torch.device, profiles: list[pd.DataFrame]) -> str:
    """The column a profile's time is read from: kernel time on CUDA when the profiler recorded any, else CPU."""
    return "device_ms" if device.type == "cuda" and any(df["device_ms"].sum() > 0 for df in profiles) else "cpu_ms"


@torch.inference_mode()
def layer_profile(model: nn.Module, *, imgsz: int, batch: int = 1, device: torch.device | str = "cpu",
                  half: bool = False, iters: int = 3, warmup: int = 1) -> pd.DataFrame:
    """Per-layer milliseconds per forward pass (mean of ``iters``) on a constant input.

    Columns: ``layer`` (index in ``model.model``), ``type``, ``params``, ``out_channels`` (of its last
    conv, the channel-pruned width), ``cpu_ms`` (CPU time spent inside the layer's range, kernels
    launched included), ``device_ms`` (kernel time on CUDA; 0 on the CPU), ``share`` (of the summed
    time: device on CUDA, else CPU). Sorted by layer.
    """
    device = torch.device(device)
    layers = list(model.model)
    x = torch.full((batch, 3, imgsz, imgsz), 0.5, device=device, dtype=torch.half if half else torch.float)
    open_ranges: dict[int, torch.profiler.record_function] = {}
    handles = []
    for i, m in enumerate(layers):
        def pre(mod, inp, i=i):
            r = torch.profiler.record_function(_label(i, mod))
            r.__enter__()
            open_ranges[i] = r

        def post(mod, inp, out, i=i):
            open_ranges.pop(i).__exit__(None, None, None)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        for _ in range(warmup):
            model(x)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(iters):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    finally:
        for h in handles:
            h.remove()
    times = {e.key: e for e in prof.key_averages() if e.key.startswith(_PREFIX)}
    rows = []
    for i, m in enumerate(layers):
        e = times.get(_label(i, m))
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
        dev_us = (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0) if e else 0
        rows.append({"layer": i, "type": type(m).__name__, "params": sum(p.numel() for p in m.parameters()),
                     "out_channels": convs[-1].out_channels if convs else None,
                     "cpu_ms": (e.cpu_time_total / 1e3 / iters) if e else 0.0, "device_ms": dev_us / 1e3 / iters})
    df = pd.DataFrame(rows)
    col = _time_column(device, [df])
    df["share"] = df[col] / max(df[col].sum(), 1e-12)
    return df


def layer_time_table(model: nn.Module, dense: nn.Module | None, *, imgsz: int, device: torch.device | str = "cpu",
                     half: bool = False, iters: int = 5) -> pd.DataFrame:
    """Where the time goes, the evaluated model beside its dense reference (same device, precision, input).

    One row per top-level layer: ``layer``, ``type``, ``out_channels`` / ``dense_out_channels``, ``params`` /
    ``dense_params``, ``ms`` / ``dense_ms`` (per batch-1 forward pass, the median of ``iters`` passes timed
    alternately with the dense model: kernel time on CUDA where the profiler records it, else CPU time) and
    ``speedup`` (dense_ms / ms). ``dense`` None (a dense job): the dense columns repeat the model's own.
    Channel pruning shows here which layers got faster and which (the Detect head, kept whole; the
    concatenations and upsampling, no weights) did not.
    """
    # alternated, one pass each per round, median per layer: the two models see the same machine load
    # (as the latency's dense reference is timed), so a busy machine does not show as a speed-up or a loss
    mine_runs, ref_runs = [], []
    for r in range(max(1, iters)):
        mine_runs.append(layer_profile(model, imgsz=imgsz, device=device, half=half, iters=1, warmup=int(r == 0)))
        if dense is not None:
            ref_runs.append(layer_profile(dense, imgsz=imgsz, device=device, half=half, iters=1, warmup=int(r == 0)))
    col = _time_column(torch.device(device), mine_runs + ref_runs)
    mine = mine_runs[0]
    ref = ref_runs[0] if ref_runs else mine
    ms = pd.concat([t[col] for t in mine_runs], axis=1).median(axis=1)
    dense_ms = pd.concat([t[col] for t in ref_runs], axis=1).median(axis=1) if ref_runs else ms
    out = pd.DataFrame({"layer": mine["layer"], "type": mine["type"],
                        "out_channels": mine["out_channels"], "dense_out_channels": ref["out_channels"],
                        "params": mine["params"], "dense_params": ref["params"], "ms": ms, "dense_ms": dense_ms})
    out["speedup"] = out["dense_ms"] / out["ms"].where(out["ms"] > 0)
    return out
