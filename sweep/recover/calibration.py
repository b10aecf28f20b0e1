"""Calibration images for recovery: unlabeled, letterboxed, never the evaluated images.

Where they come from is decided by ``sweep.config.resolve`` (``recover.data``: an image folder, a
``.txt`` image list, or a YOLOv5 dataset yaml's ``train`` split; else the dataset's ``train``
split). Images are taken in sorted path order, the first ``recover.images`` of them, decoded and
letterboxed exactly as for evaluation (``sweep.data``) but to a square ``eval.imgsz`` canvas (no
rect batches: every batch has the same shape), ``recover.batch`` images per forward pass.
Calibrating on the images being evaluated is refused unless ``recover.allow_eval_images=true``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from sweep.assets import file_sha256
from sweep.config.schema import ConfigError
from sweep.config.spec import RecoverSpec
from sweep.data import DataError, Dataset
from sweep.data.train import TrainLoader

log = logging.getLogger(__name__)

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
    dataset: Any = field(repr=False, default=None)  # sweep.data.Dataset (rect=False, labels=False)
    train: Any = field(repr=False, default=None)    # sweep.data.train.TrainLoader, for methods that train
    progress: bool = True

    def __len__(self) -> int:
        return len(self.files)

    def batches(self) -> Iterator[torch.Tensor]:
        for b in self.dataset.iter_batches():
            yield b.images




# --------------------------------------------------------------------------- calibration data


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


def calibration_images(spec: RecoverSpec, imgsz: int, workers: int, eval_files: Sequence[str],
                       device: Any, names: Sequence[str] | None = None, progress: bool = True) -> Calibration | None:
    """The calibration images of ``spec.source`` (None when there is none, i.e. ``recover=none``).

    The first ``spec.images`` files in sorted path order are taken; an unreadable one among them is
    skipped with a warning (not replaced), so ``recover_images`` can be smaller. They are letterboxed
    to a square ``imgsz`` canvas, ``spec.batch`` per forward pass. ``eval_files``: the paths of the
    evaluated images. Raises ConfigError when the source has no usable image, and when a calibration
    image is also an evaluation image (unless ``spec.allow_eval_images``).

    A method that trains (``spec.labeled``) also gets its labeled training batches (``train``: every
    image of the source, or the first ``spec.data_limit``, with YOLOv5's augmentation unless
    ``spec.augment`` is false; class ids checked against ``names``), under the same rules plus one:
    the source must have labels.
    """
    if spec.source is None:
        return None
    src, key = spec.source, spec.source_key
    shown = src if isinstance(src, str) else ", ".join(map(str, src))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = Dataset(list(src) if not isinstance(src, str) else src, imgsz=imgsz, batch=spec.batch, rect=False,
                         labels=False, limit=spec.images, workers=workers)
        for w in caught:
            log.warning("calibration data %s: %s", shown, w.message)
    except DataError as e:
        raise ConfigError(f"{key}={shown!r} gives no calibration images ({e}); allowed is {ALLOWED_SOURCES}") from None
    if len(ds) < spec.images:
        log.warning("calibration: %d images requested (recover.images) but %s has %d usable; using %d", spec.images,
                    shown, len(ds), len(ds))
    pairs = eval_overlap(ds.files, list(eval_files))
    if pairs and not spec.allow_eval_images:
        c, e = pairs[0]
        raise ConfigError(
            f"{key}={shown!r}: {len(pairs)} calibration image(s) are also evaluation images (e.g. {c} is {e}); "
            "calibrating on the evaluated images inflates the result. Allowed: calibration images disjoint from "
            "the evaluation set (set recover.data), or recover.allow_eval_images=true to do it anyway")
    if pairs:
        log.warning("calibration: %d of %d images are evaluation images (recover.allow_eval_images=true)",
                    len(pairs), len(ds))
    train = _training_batches(spec, shown, imgsz, workers, eval_files, names) if spec.labeled else None
    return Calibration(list(ds.files), shown, imgsz, spec.batch, torch.device(device), ds, train, progress)


def _training_batches(spec: RecoverSpec, shown: str, imgsz: int, workers: int, eval_files: Sequence[str],
                      names: Sequence[str] | None) -> Any:
    """The labeled training loader of ``spec.source``, refused when it has no labels or holds evaluated images."""
    key = spec.source_key
    src = list(spec.source) if not isinstance(spec.source, str) else spec.source
    try:
        loader = TrainLoader(src, imgsz=imgsz, batch=spec.batch, hyp=dict(spec.hyp), augment=spec.augment,
                             seed=spec.seed, workers=workers, names=list(names) if names else None,
                             limit=spec.data_limit)
    except DataError as e:
        raise ConfigError(f"{key}={shown!r} gives no training images ({e}); allowed is a labeled YOLO dataset "
                          "split (images with label files beside them under labels/)") from None
    if loader.instances == 0:
        raise ConfigError(f"{key}={shown!r} has no labels (no YOLO label file beside its {len(loader.files)} "
                          f"images): recover.method={spec.method!r} trains on labels; allowed is a labeled split "
                          "(e.g. data=coco-val128 trains on the labeled coco128)")
    pairs = eval_overlap(loader.files, list(eval_files))
    if pairs and not spec.allow_eval_images:
        c, e = pairs[0]
        raise ConfigError(f"{key}={shown!r}: {len(pairs)} training image(s) are also evaluation images (e.g. {c} is "
                          f"{e}); training on the evaluated images inflates the result. Allowed: a training split "
                          "disjoint from the evaluation set, or recover.allow_eval_images=true to do it anyway")
    return loader
