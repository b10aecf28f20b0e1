"""Accuracy recovery after pruning, without labels: registry ``RECOVERERS``.

A job calls ``RECOVERERS[cfg.recover.method](model, cfg, calibration)`` on the pruned,
still UNFUSED model (before ``sweep.model.yolo.fuse``) and merges the returned dict into its
metrics. Every recoverer has the one signature ``fn(model, cfg, calibration) -> dict[str, float]``
and changes ``model`` in place; a new method is one more function and one more registry entry.

* ``none``: the tutorial; returns ``{}`` and touches nothing.
* ``bn``: BatchNorm recalibration. Pruning shifts every layer's activation statistics, so the
  running mean/variance that BatchNorm (and, after fusion, the folded conv bias/scale) uses are
  stale. ``bn`` resets them and re-estimates them by forward passes in train mode, without
  gradients, over unlabeled calibration images. Only BatchNorm buffers change: no parameter is
  written, so pruned weights stay exactly zero.

Calibration data (:func:`calibration_source`): ``recover.data`` (an image folder, a ``.txt`` image
list, or a YOLOv5 dataset yaml whose ``train`` split is used), else the job's dataset ``train``
split. Images are taken in sorted path order, the first ``recover.images`` of them, decoded and
letterboxed exactly as for evaluation (``sweep.data.dataset``), but to a square ``eval.imgsz`` canvas
(no rect batches: every batch has the same shape), ``recover.batch`` images per forward pass.
Calibrating on the images being evaluated is refused unless ``recover.allow_eval_images=true``.

Determinism: the image order and the batches are fixed, and the statistics are a cumulative
average, so the result does not depend on anything but the inputs. Nondeterminism left: float
summation order inside BatchNorm/conv kernels can differ across devices, thread counts and
CUDA/cuDNN algorithm choices (last-bit differences in the statistics, typically far below the
4th decimal of mAP). On CPU with a fixed thread count, repeated runs give identical buffers.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from sweep.assets import file_sha256
from sweep.config.schema import ConfigError

log = logging.getLogger(__name__)

DATASET_CONFIG_SUFFIXES = (".yaml", ".yml")
ALLOWED_SOURCES = ("an image folder, a .txt list of images, or a YOLOv5 dataset yaml with a 'train' split "
                   "(e.g. recover.data=<cache>/datasets/coco128-calib/images/train2017)")


@dataclass
class Calibration:
    """Unlabeled calibration images, ready to iterate as square letterboxed batches.

    ``files``: the images used, in iteration order (sorted by path). ``source``: where they came
    from (for messages). Batches are decoded lazily by :meth:`batches` (``uint8 [B, 3, imgsz,
    imgsz]`` RGB, on the CPU); the recoverer moves them to ``device``.
    """

    files: list[str]
    source: str
    imgsz: int
    batch: int
    device: torch.device
    dataset: Any = field(repr=False, default=None)  # sweep.data.dataset.Dataset (rect=False, labels=False)

    def __len__(self) -> int:
        return len(self.files)

    def batches(self) -> Iterator[torch.Tensor]:
        for b in self.dataset.iter_batches():
            yield b.images


RecovererFn = Callable[[nn.Module, DictConfig, "Calibration | None"], dict[str, float]]


# --------------------------------------------------------------------------- calibration data


def _source(cfg: DictConfig) -> tuple[Any, str]:
    """The calibration source (path or list of paths) and the config key it came from."""
    r = cfg.recover
    if r.get("data"):
        p = Path(str(r.data)).expanduser()
        if p.suffix.lower() in DATASET_CONFIG_SUFFIXES:
            from sweep.data.dataset import DataError, load_data_yaml

            try:
                y = load_data_yaml(p)
            except DataError as e:
                raise ConfigError(f"recover.data={str(r.data)!r}: {e}; allowed is {ALLOWED_SOURCES}") from None
            if not y.get("train"):
                raise ConfigError(f"recover.data={str(r.data)!r}: the dataset yaml has no 'train' split; "
                                  f"allowed is {ALLOWED_SOURCES}")
            return y["train"], "recover.data"
        return str(p), "recover.data"
    d = cfg.data
    if d.get("yaml"):
        from sweep.data.dataset import load_data_yaml

        train = load_data_yaml(Path(str(d.yaml)).expanduser()).get("train")
        if train:
            return train, "data.yaml train"
    elif d.get("train"):
        train = d.train
        root = Path(str(d.path)).expanduser() if d.get("path") else Path(".")
        if isinstance(train, (str, Path)):
            t = Path(str(train)).expanduser()
            return str(t if t.is_absolute() else root / t), "data.train"
        return [str(Path(str(t)).expanduser() if Path(str(t)).expanduser().is_absolute() else root / str(t))
                for t in train], "data.train"
    raise ConfigError(f"recover.method={cfg.recover.method!r} needs calibration images, but recover.data is empty "
                      f"and data {cfg.data.get('name')!r} has no train split: set recover.data to "
                      f"{ALLOWED_SOURCES}")


def eval_overlap(calibration_files: list[str], eval_files: list[str]) -> list[tuple[str, str]]:
    """Pairs (calibration image, evaluation image) that are the same image.

    Same image = same resolved path, or same size and (same file name or same content hash).
    Only files whose sizes match are hashed, so this stays cheap for large evaluation sets.
    """
    by_size: dict[int, list[str]] = {}
    calib_real: dict[str, str] = {}
    for f in calibration_files:
        real = os.path.realpath(f)
        calib_real[real] = f
        by_size.setdefault(os.path.getsize(f), []).append(f)
    hashes: dict[str, str] = {}

    def digest(p: str) -> str:
        if p not in hashes:
            hashes[p] = file_sha256(p)
        return hashes[p]

    pairs = []
    for e in eval_files:
        real = os.path.realpath(e)
        if real in calib_real:
            pairs.append((calib_real[real], e))
            continue
        try:
            size = os.path.getsize(e)
        except OSError:
            continue
        for c in by_size.get(size, ()):
            if os.path.basename(c) == os.path.basename(e) or digest(c) == digest(e):
                pairs.append((c, e))
                break
    return pairs


def calibration_source(cfg: DictConfig, eval_files: Sequence[str], device: Any) -> Calibration | None:
    """The calibration images for ``cfg.recover`` (None for ``recover.method=none``).

    Source: ``recover.data`` (relative paths are relative to the working directory; a ``.yaml``/
    ``.yml`` file is a YOLOv5 dataset yaml and its ``train`` split is used), else the dataset's
    train split (``data.train``, relative to ``data.path``; or the ``train`` of ``data.yaml``).
    The first ``recover.images`` files in sorted path order are taken; an unreadable one among
    them is skipped with a warning (not replaced), so ``recover_images`` can be smaller.

    ``eval_files``: the paths of the evaluated images. ``device``: where the recoverer runs the
    forward passes. Raises
    ConfigError when there is no source, when it has no usable image, and when a calibration image
    is also an evaluation image (unless ``recover.allow_eval_images=true``).
    """
    if cfg.recover.method == "none":
        return None
    from sweep.data.dataset import DataError, Dataset

    src, key = _source(cfg)
    r = cfg.recover
    imgsz, batch, n = int(cfg.eval.imgsz), int(r.batch), int(r.images)
    shown = src if isinstance(src, str) else ", ".join(map(str, src))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = Dataset(src, imgsz=imgsz, batch=batch, rect=False, labels=False, limit=n,
                         workers=int(cfg.eval.get("workers", 2)))
        for w in caught:
            log.warning("calibration data %s: %s", shown, w.message)
    except DataError as e:
        raise ConfigError(f"{key}={shown!r} gives no calibration images ({e}); allowed is {ALLOWED_SOURCES}") from None
    if len(ds) < n:
        log.warning("calibration: %d images requested (recover.images) but %s has %d usable; using %d", n, shown,
                    len(ds), len(ds))
    pairs = eval_overlap(ds.files, list(eval_files))
    if pairs and not r.allow_eval_images:
        c, e = pairs[0]
        raise ConfigError(
            f"{key}={shown!r}: {len(pairs)} calibration image(s) are also evaluation images (e.g. {c} is {e}); "
            "calibrating on the evaluated images inflates the result. Allowed: calibration images disjoint from "
            "the evaluation set (set recover.data), or recover.allow_eval_images=true to do it anyway")
    if pairs:
        log.warning("calibration: %d of %d images are evaluation images (recover.allow_eval_images=true)",
                    len(pairs), len(ds))
    return Calibration(list(ds.files), shown, imgsz, batch, torch.device(device), ds)


# --------------------------------------------------------------------------- recoverers


def no_recovery(model: nn.Module, cfg: DictConfig, calibration: Calibration | None) -> dict[str, float]:
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
        with torch.no_grad():
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


def bn_recalibration(model: nn.Module, cfg: DictConfig, calibration: Calibration | None) -> dict[str, float]:
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


RECOVERERS: dict[str, RecovererFn] = {
    "none": no_recovery,
    "bn": bn_recalibration,
}
