"""ONNX export of an evaluated (pruned, fused) model and its ONNX Runtime latency.

The deployment question "is the pruned model faster where it will run?" is answered by a runtime
that does not know about pruning masks: the model (rebuilt from its pickle-free artifact, FP32, CPU)
is exported to ONNX with a dynamic batch axis, ONNX Runtime runs it, and

1. :func:`check_outputs` compares ONNX Runtime's detections tensor with PyTorch's on the same
   seeded input; a difference beyond ``|ort - torch| <= ATOL + RTOL * |torch|`` raises
   :class:`OutputMismatchError` and no latency is reported;
2. :func:`measure_ort_latency` times ``session.run`` (median of ``iters``) at batch 1 and at the
   evaluation batch, as ``measure_latency`` does for PyTorch.

Channel pruning makes every tensor smaller, so the exported graph does less work; unstructured
pruning keeps every shape (zeros are still multiplied), so its latency stays flat.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

log = logging.getLogger(__name__)

# Tolerance of the output-match check on the [B, N, 5 + nc] detections tensor (box centre/size in
# input pixels, objectness and class scores in [0, 1]) for FP32 on both sides.
RTOL = 1e-3
ATOL = 1e-3
OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "detections"


class OutputMismatchError(RuntimeError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the stated tolerance."""


class _Detections(nn.Module):
    """The model's eval-mode detections tensor only (the raw per-level maps are not exported)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def export_onnx(model: nn.Module, path: str | os.PathLike, imgsz: int, opset: int = OPSET) -> Path:
    """Export ``model`` (FP32 CPU copy of it, eval mode) to ``path``: input ``images`` [B, 3, imgsz, imgsz]
    with a dynamic batch axis, output ``detections`` [B, N, 5 + nc]. Weights inside the one file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _Detections(model).float().cpu().eval()
    x = torch.zeros(1, 3, imgsz, imgsz)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer / deprecation chatter about the legacy exporter
        torch.onnx.export(wrapped, (x,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
    return path


def providers_for(device: torch.device | str) -> list[str]:
    """ONNX Runtime execution providers: CUDA first when the job runs on CUDA and onnxruntime has it."""
    available = ort.get_available_providers()
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(path: str | os.PathLike, device: torch.device | str = "cpu", threads: int | None = None):
    """An inference session on ``path`` (all graph optimisations; intra-op threads = torch's by default,
    so both runtimes get the same cores; no spin-waiting)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.log_severity_level = 3
    # idle intra-op threads sleep instead of spinning: two sessions timed alternately (and the other
    # processes of a shared machine) would otherwise compete with spinning threads between runs
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers_for(device))


def sample_input(imgsz: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    """The seeded [batch, 3, imgsz, imgsz] FP32 input in [0, 1] both runtimes see in the check."""
    return np.random.default_rng(seed).random((batch, 3, imgsz, imgsz), dtype=np.float32)


@dataclass(frozen=True)
class MatchResult:
    max_abs_diff: float
    worst_excess: float   # max of |ort - torch| - (ATOL + RTOL |torch|); <= 0 when within tolerance


@torch.no_grad()
def check_outputs(model: nn.Module, session, imgsz: int, batch: int = 1, rtol: float = RTOL, atol: float = ATOL,
                  seed: int = 0) -> MatchResult:
    """Run PyTorch (``model`` as FP32 on the CPU) and ONNX Runtime on the same seeded input; raise
    :class:`OutputMismatchError` unless every element of the detections tensor is within
    ``atol + rtol * |torch|``."""
    x = sample_input(imgsz, batch, seed)
    expected = _Detections(model).float().cpu().eval()(torch.from_numpy(x)).numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    if got.shape != expected.shape:
        raise OutputMismatchError(f"ONNX Runtime's output has shape {list(got.shape)}, PyTorch's "
                                  f"{list(expected.shape)}: the export is not the evaluated model")
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    excess = diff - (atol + rtol * np.abs(expected.astype(np.float64)))
    if not np.isfinite(got).all():
        raise OutputMismatchError("ONNX Runtime's output has non-finite values where PyTorch's has none")
    result = MatchResult(float(diff.max()), float(excess.max()))
    if result.worst_excess > 0:
        i = np.unravel_index(int(np.argmax(excess)), excess.shape)
        raise OutputMismatchError(
            f"ONNX Runtime's outputs differ from PyTorch's beyond the tolerance |ort - torch| <= {atol:g} + "
            f"{rtol:g} |torch|: max |diff| {result.max_abs_diff:.4g}; worst element {list(map(int, i))}: "
            f"ort {float(got[i]):.6g}, torch {float(expected[i]):.6g}; no ONNX Runtime latency is reported")
    return result


def measure_ort_latency(session, imgsz: int, batch: int, iters: int, warmup: int = 2) -> float:
    """Median milliseconds of one ``session.run`` on a fixed [batch, 3, imgsz, imgsz] input of 0.5
    (the input ``measure_latency`` uses)."""
    x = np.full((batch, 3, imgsz, imgsz), 0.5, dtype=np.float32)
    for _ in range(warmup):
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def alternate_b1(session, reference, imgsz: int, iters: int, warmup: int = 2) -> tuple[float, float]:
    """Median batch-1 milliseconds of ``session`` and ``reference`` timed alternately (one run each per
    round), so a busy machine slows both alike and their ratio stays meaningful."""
    x = np.full((1, 3, imgsz, imgsz), 0.5, dtype=np.float32)
    for s in (session, reference):
        for _ in range(warmup):
            s.run([OUTPUT_NAME], {INPUT_NAME: x})
    a, b = [], []
    for _ in range(iters):
        for s, out in ((session, a), (reference, b)):
            t0 = time.perf_counter()
            s.run([OUTPUT_NAME], {INPUT_NAME: x})
            out.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(a)), float(statistics.median(b))


@dataclass(frozen=True)
class RuntimeLatency:
    provider: str
    b1_ms: float
    batch: int
    batch_ms_per_image: float
    max_abs_diff: float
    onnx_mb: float
    dense_b1_ms: float | None = None   # the dense reference, timed alternately with the model
    speedup_b1: float | None = None    # dense_b1_ms / b1_ms


def onnx_runtime_latency(model: nn.Module, onnx_path: str | os.PathLike, *, imgsz: int, batch: int, iters: int,
                         batch_iters: int | None = None, device: torch.device | str = "cpu",
                         reference: nn.Module | None = None) -> RuntimeLatency:
    """Export ``model`` to ``onnx_path``, check ONNX Runtime's outputs against PyTorch's (raises
    :class:`OutputMismatchError`), then time batch 1 and batch ``batch`` (per image). With ``reference``
    (the dense model), batch 1 is timed alternately with the reference's export: ``speedup_b1``."""
    path = export_onnx(model, onnx_path, imgsz)
    session = ort_session(path, device)
    match = check_outputs(model, session, imgsz)
    dense_b1 = speedup = None
    if reference is None:
        b1 = measure_ort_latency(session, imgsz, 1, iters)
    else:
        with tempfile.TemporaryDirectory(prefix="sweep-dense-onnx-") as tmp:
            ref = ort_session(export_onnx(reference, Path(tmp) / "dense.onnx", imgsz), device)
            b1, dense_b1 = alternate_b1(session, ref, imgsz, iters)
        speedup = dense_b1 / b1
    bn = measure_ort_latency(session, imgsz, batch, batch_iters or max(1, iters // 4)) / batch
    return RuntimeLatency(session.get_providers()[0], b1, batch, bn, match.max_abs_diff, path.stat().st_size / 1e6,
                          dense_b1, speedup)
