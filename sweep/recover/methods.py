"""Accuracy recovery after pruning: registry ``RECOVERERS``.

A job calls ``RECOVERERS[spec.method](model, spec, calibration)`` on the pruned, still UNFUSED
model (before ``sweep.model.fuse``) and merges the returned dict into its metrics. Every recoverer
has the one signature ``fn(model, spec: RecoverSpec, calibration) -> dict[str, float]`` and
changes ``model`` in place; a new method is one more function and one more registry entry.

* ``none``: the tutorial; returns ``{}`` and touches nothing.
* ``finetune``: YOLOv5's training recipe on labeled images (``sweep.recover.finetune``): BatchNorm
  recalibration first (unless ``recover.recalibrate=false``), then ``recover.epochs`` epochs (optionally
  capped at ``recover.iters`` batches) with pruned weights held at exactly zero; the EMA weights are
  what is evaluated, as YOLOv5 saves them. The loss and learning-rate curves are returned per step.
* ``bn``: BatchNorm recalibration. Pruning shifts every layer's activation statistics, so the
  running mean/variance that BatchNorm (and, after fusion, the folded conv bias/scale) uses are
  stale. ``bn`` resets them and re-estimates them by forward passes in train mode, without
  gradients, over unlabeled calibration images (``sweep.recover.calibration``). Only BatchNorm
  buffers change: no parameter is written, so pruned weights stay exactly zero.

Determinism: the image order and the batches are fixed, and the statistics are a cumulative
average, so the result does not depend on anything but the inputs. Nondeterminism left: float
summation order inside BatchNorm/conv kernels can differ across devices, thread counts and
CUDA/cuDNN algorithm choices (last-bit differences in the statistics, typically far below the
4th decimal of mAP). On CPU with a fixed thread count, repeated runs give identical buffers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sweep.config.schema import ConfigError
from sweep.config.spec import RecoverSpec
from sweep import contract
from sweep.recover.calibration import ALLOWED_SOURCES, Calibration
from sweep.recover.finetune import finetune

log = logging.getLogger(__name__)

# Values are numbers, or per-step lists of numbers (logged as MLflow step metrics).
RecovererFn = Callable[[nn.Module, RecoverSpec, "Calibration | None"], dict[str, Any]]


# --------------------------------------------------------------------------- recoverers


def no_recovery(model: nn.Module, spec: RecoverSpec, calibration: Calibration | None) -> dict[str, float]:
    """``recover=none``: leave the model as it is."""
    return {}


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def recalibrate_batchnorm(model: nn.Module, batches: Any, device: Any = None) -> int:
    """Re-estimate every BatchNorm's running statistics from ``batches`` (uint8 or float images 0-255).

    Resets the running stats, sets ``momentum=None`` (cumulative average: every batch weighs the
    same, also a smaller last one; the variance is the average of the per-batch unbiased
    variances, as PyTorch accumulates it), runs the batches in train mode under ``torch.no_grad()``,
    then restores each momentum, the model's original device, and eval mode. Parameters are
    never written. Returns the number of images seen. Raises ValueError when the model has no
    BatchNorm (e.g. already fused) or no image was given.
    """
    bns = batchnorm_layers(model)
    if not bns:
        raise ValueError("the model has no BatchNorm layers with running statistics (already fused?): "
                         "BatchNorm recalibration needs the unfused model")
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    dev = torch.device(device) if device is not None else home
    dtype = first.dtype if first is not None else torch.float32
    momenta = [m.momentum for m in bns]
    seen = 0
    try:
        model.to(dev)
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        # full FP32 convolutions on CUDA (cuDNN's TF32 default rounds their inputs to 10 mantissa bits): the
        # statistics are the same as on the CPU, where the reference figures were computed; restored after
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                                         benchmark=torch.backends.cudnn.benchmark,
                                                         deterministic=torch.backends.cudnn.deterministic,
                                                         allow_tf32=False):
            for images in batches:
                x = images.to(dev, non_blocking=True).to(dtype) / 255.0
                model(x)
                seen += int(x.shape[0])
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.to(home)
        model.eval()
    if seen == 0:
        raise ValueError("BatchNorm recalibration got no calibration images")
    return seen


def bn_recalibration(model: nn.Module, spec: RecoverSpec, calibration: Calibration | None) -> dict[str, float]:
    """``recover=bn``: BatchNorm recalibration on the calibration images (see the module doc)."""
    if calibration is None:
        raise ConfigError("recover.method='bn' needs calibration images: set recover.data to "
                          f"{ALLOWED_SOURCES}")
    if not batchnorm_layers(model):
        raise ConfigError("recover.method='bn' found no BatchNorm layer in the model: it was fused before "
                          "recovery; allowed is prune.fused=false (prune the unfused model, recalibrate, then fuse)")
    t0 = time.perf_counter()
    seen = recalibrate_batchnorm(model, calibration.batches(), calibration.device)
    if calibration.device.type == "cuda":
        torch.cuda.synchronize(calibration.device)
    seconds = time.perf_counter() - t0
    log.info("BatchNorm recalibration: %d layers, %d images from %s in %.1fs", len(batchnorm_layers(model)), seen,
             calibration.source, seconds)
    return {"recover_images": seen, "recover_seconds": float(seconds)}


@torch.no_grad()
def round_to_half(model: nn.Module) -> None:
    """Round every floating-point parameter and buffer to FP16 and back, in place: the weights a YOLOv5
    checkpoint holds (``train.py`` saves ``ema.half()``). Zeros stay exactly zero."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            t.copy_(t.half().to(t.dtype))


def finetune_recovery(model: nn.Module, spec: RecoverSpec, calibration: Calibration | None) -> dict[str, Any]:
    """``recover=finetune``: BatchNorm recalibration, then YOLOv5's recipe on the labeled training batches."""
    if calibration is None or calibration.train is None:
        raise ConfigError("recover.method='finetune' needs labeled training images: set recover.data to a labeled "
                          "split (a data config such as coco128, or a YOLOv5 data yaml)")
    metrics: dict[str, Any] = {}
    if spec.recalibrate:
        bn = bn_recalibration(model, spec, calibration)
        metrics |= {"recalibrate_images": bn["recover_images"], "recalibrate_seconds": bn["recover_seconds"]}
    steps: list[dict[str, float]] = []
    trained = finetune(model, calibration.train, batch=spec.batch, epochs=spec.epochs, iters=spec.iters,
                       hyp=dict(spec.hyp), imgsz=calibration.imgsz, device=calibration.device,
                       progress=calibration.progress, on_step=lambda i, m: steps.append(m))
    metrics |= trained
    round_to_half(model)  # train.py saves the EMA in FP16 and val.py evaluates those weights: the same numbers
    metrics["recover_seconds"] = trained["recover_seconds"] + metrics.get("recalibrate_seconds", 0.0)
    for key, name in contract.TRAIN_CURVES.items():  # per-step series: the MLflow UI plots them
        metrics[name] = [s[key] for s in steps]
    return metrics


RECOVERERS: dict[str, RecovererFn] = {
    "none": no_recovery,
    "bn": bn_recalibration,
    "finetune": finetune_recovery,
}
