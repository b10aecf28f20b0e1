"""Sparsity, size and compute accounting for metrics.json and the per-layer CSV artifact.

Definitions (all measured on the model as evaluated, i.e. after pruning and fusion):

``sparsity_target``
    The requested sparsity (for ``channel``: the requested channel ratio).
``sparsity``
    Exactly-zero weights / all weights over the *selected* Conv2d ``weight`` tensors
    (biases excluded) -- the YOLOv5 pruning tutorial's definition. Channel pruning
    removes channels instead of zeroing them, so it measures ~0 here; see ``params``.
``sparsity_global``
    Zeros over *all* parameters (every conv/BN weight and bias, the Detect convs), as
    YOLOv5's ``utils.torch_utils.sparsity()`` computes it:
    ``sum((p == 0).sum()) / sum(p.numel())`` over ``model.parameters()``.
``params`` / ``params_nonzero``
    ``sum(p.numel())`` / ``sum(count_nonzero(p))`` over ``model.parameters()`` (buffers such
    as the Detect anchors are not parameters and are not counted, as in YOLOv5).
``gflops``
    FLOPs of one forward pass of a ``1x3xHxW`` input (eval mode, no grad) counted by
    ``torch.utils.flop_counter.FlopCounterMode``, divided by 1e9. That counter counts a
    convolution as ``2 * MACs`` (multiply and add) and ignores bias adds, BatchNorm,
    activations, upsampling, concatenation and the Detect grid arithmetic, so the figure
    is the same fused or unfused and is directly comparable to YOLOv5's "GFLOPs"
    (``thop`` MACs * 2 with bias adds, scaled to 640): yolov5n fused at 640x640 is 4.5
    GFLOPs in YOLOv5 and 4.468 here (rounds to 4.5; the difference is thop's bias adds and
    upsample ops, see tests/test_cost.py). Zeros do not reduce it (dense kernels still
    multiply them); only ``channel`` pruning does. GFLOPs scale with H*W.
``size_mb`` / ``size_mb_compressed``
    ``len(torch.save(model.state_dict()))`` in MB = 10^6 bytes (decimal megabytes, like
    file managers and YOLOv5's own size prints of ``os.path.getsize / 1e6``), the
    tensors in their current dtype (FP32 after ``load_checkpoint``; the official
    checkpoint file is FP16 and about half). ``size_mb_compressed`` is the same bytes
    compressed with Zstandard at level :data:`ZSTD_LEVEL`: what unstructured zeros buy on
    disk (the dense file does not shrink at all). Beware comparing across dtypes: FP16
    checkpoint weights upcast to FP32 carry 13 zero mantissa bits and compress well
    (yolov5n unfused 7.64 -> 4.54 MB) while BN-folded FP32 weights do not (7.51 -> 6.82 MB);
    compare pruned against dense at the same fusion state and dtype.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any, Optional, Sequence, Union

import pandas as pd
import torch
import torch.nn as nn
import zstandard
from torch.utils.flop_counter import FlopCounterMode

MB = 1e6  # bytes per MB (decimal)
ZSTD_LEVEL = 3  # zstandard's default level: fast enough for yolov5x (~350 MB FP32)

LAYER_COLUMNS = ["layer", "selected", "shape", "numel", "zeros", "sparsity", "zero_filters"]


def _convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _selected_set(model: nn.Module, selected_names: Optional[Iterable[str]]) -> set[str]:
    names = {n for n, _ in _convs(model)}
    if selected_names is None:
        return names
    selected = set(selected_names)
    missing = sorted(selected - names)
    if missing:
        raise ValueError(f"selected layers are not Conv2d modules of the model: {missing[:5]}")
    return selected


@torch.no_grad()
def layer_table(model: nn.Module, selected_names: Optional[Iterable[str]] = None) -> pd.DataFrame:
    """Per-Conv2d measured sparsity of ``weight``, one row per conv in network order.

    Columns: ``layer`` (module name), ``selected`` (pruning-eligible), ``shape`` (e.g.
    ``"32x16x3x3"``), ``numel``, ``zeros`` (exactly zero), ``sparsity`` (zeros/numel),
    ``zero_filters`` (output filters that are entirely zero).
    """
    selected = _selected_set(model, selected_names)
    rows = []
    for name, m in _convs(model):
        w = m.weight.detach()
        zeros = int((w == 0).sum())
        rows.append({
            "layer": name,
            "selected": name in selected,
            "shape": "x".join(str(s) for s in w.shape),
            "numel": int(w.numel()),
            "zeros": zeros,
            "sparsity": zeros / w.numel() if w.numel() else 0.0,
            "zero_filters": int((w.flatten(1) == 0).all(dim=1).sum()) if w.dim() > 1 else 0,
        })
    return pd.DataFrame(rows, columns=LAYER_COLUMNS)


@torch.no_grad()
def sparsity_global(model: nn.Module) -> float:
    """YOLOv5's ``sparsity(model)``: zeros / numel over all ``model.parameters()``."""
    total = zeros = 0
    for p in model.parameters():
        total += p.numel()
        zeros += int((p == 0).sum())
    return zeros / total if total else 0.0


@torch.no_grad()
def param_counts(model: nn.Module) -> tuple[int, int]:
    """``(params, params_nonzero)`` over ``model.parameters()``."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    return total, nonzero


def _hw(imgsz: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(imgsz, int):
        return imgsz, imgsz
    h, w = imgsz
    return int(h), int(w)


@torch.no_grad()
def gflops(model: nn.Module, imgsz: Union[int, Sequence[int]] = 640) -> float:
    """GFLOPs (= 2 * GMACs of the convolutions and matmuls) of one ``1x3xHxW`` forward pass.

    Counted on PyTorch's ``meta`` device (shapes only: no arithmetic, no activation memory; yolov5n at 640
    ~7x faster than a real pass), the model's parameters and buffers swapped for meta tensors of the same
    shapes by ``torch.func.functional_call``; a model whose forward cannot run on meta tensors (a tensor kept
    outside its parameters and buffers) is counted by a real pass. Both count the same operators.
    """
    h, w = _hw(imgsz)
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        try:
            return _count_flops(model, torch.zeros(1, 3, h, w, device="meta", dtype=p.dtype), meta=True)
        except (RuntimeError, TypeError, ValueError):  # NotImplementedError is a RuntimeError
            return _count_flops(model, torch.zeros(1, 3, h, w, device=p.device, dtype=p.dtype), meta=False)
    finally:
        model.train(was_training)


def _count_flops(model: nn.Module, x: torch.Tensor, meta: bool) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        if meta:
            shapes = {k: torch.empty_like(v, device="meta")
                      for k, v in [*model.named_parameters(), *model.named_buffers()]}
            torch.func.functional_call(model, shapes, (x,))
        else:
            model(x)
    return counter.get_total_flops() / 1e9


def state_dict_bytes(model: nn.Module | dict[str, torch.Tensor]) -> bytes:
    """``torch.save(model.state_dict())`` as bytes (dense, current dtype); a state_dict may be given instead."""
    buf = io.BytesIO()
    torch.save(model.state_dict() if isinstance(model, nn.Module) else model, buf)
    return buf.getvalue()


def sizes_mb(model: nn.Module | dict[str, torch.Tensor], level: int = ZSTD_LEVEL) -> tuple[float, float]:
    """``(size_mb, size_mb_compressed)``: the saved state_dict, raw and zstd-compressed, in 1e6 B.

    Given the ``state_dict()`` taken at accounting time it can run in another thread while the model is used
    (evaluation never changes a weight in place; a cast or a move makes new tensors)."""
    raw = state_dict_bytes(model)
    packed = zstandard.ZstdCompressor(level=level).compress(raw)
    return len(raw) / MB, len(packed) / MB


def same_shapes(model: nn.Module, other: nn.Module) -> bool:
    """True when both have the same named parameters and buffers with the same shapes (then the same
    GFLOPs: :func:`gflops` counts from shapes only)."""
    a, b = model.state_dict(), other.state_dict()
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


@torch.no_grad()
def accounting(
    model: nn.Module,
    selected_names: Optional[Iterable[str]],
    imgsz: Union[int, Sequence[int]],
    sparsity_target: Optional[float] = None,
    reference: Optional[dict[str, Any]] = None,
    reference_model: Optional[nn.Module] = None,
    sizes: bool = True,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Every accounting metric of ``model`` and the per-layer table.

    ``selected_names`` are the pruning-eligible convs (``select_convs(...).keys()``; ``None``
    = all Conv2d), ``imgsz`` the evaluated image size (int or ``(h, w)``).

    Returns ``(metrics, layers)``: ``metrics`` has ``sparsity_target`` (omitted when None),
    ``sparsity``, ``sparsity_global``, ``params``, ``params_nonzero``, ``gflops``,
    ``size_mb``, ``size_mb_compressed``; with ``reference`` (the metrics of the dense model)
    also ``params_ratio`` and ``gflops_ratio`` (pruned / dense, the channel method's
    reduction). ``layers`` is :func:`layer_table` (write it with ``to_csv(index=False)``).

    ``reference_model`` (the dense model ``reference`` was measured on): when ``model`` has its shapes (every
    method but ``channel``: zeros do not change a FLOP count), ``gflops`` is the reference's, not counted
    again. ``sizes=False`` leaves out the two sizes (the caller computes them elsewhere, :func:`sizes_mb`).
    """
    layers = layer_table(model, selected_names)
    sel = layers[layers["selected"]]
    numel = int(sel["numel"].sum())
    params, nonzero = param_counts(model)
    reuse = reference is not None and reference_model is not None and "gflops" in reference \
        and same_shapes(model, reference_model)
    metrics: dict[str, Any] = {}
    if sparsity_target is not None:
        metrics["sparsity_target"] = float(sparsity_target)
    metrics.update({
        "sparsity": int(sel["zeros"].sum()) / numel if numel else 0.0,
        "sparsity_global": (params - nonzero) / params if params else 0.0,  # = sparsity_global(model), one pass
        "params": params,
        "params_nonzero": nonzero,
        "gflops": reference["gflops"] if reuse else gflops(model, imgsz),  # type: ignore[index]
    })
    if sizes:
        metrics["size_mb"], metrics["size_mb_compressed"] = sizes_mb(model)
    if reference:
        if reference.get("params"):
            metrics["params_ratio"] = params / reference["params"]
        if reference.get("gflops"):
            metrics["gflops_ratio"] = metrics["gflops"] / reference["gflops"]
    return metrics, layers
