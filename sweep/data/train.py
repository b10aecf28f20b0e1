"""Labeled training batches with YOLOv5's training augmentation (``LoadImagesAndLabels``, v7.0).

:class:`TrainLoader` yields ``(images uint8 [B, 3, S, S] RGB, targets float32 [N, 6])`` batches,
targets ``(image index in the batch, class, cx, cy, w, h)`` normalised to ``S`` (the input
:func:`sweep.recover.finetune.finetune` and :class:`sweep.loss.YoloLoss` take). Calling the
loader with an epoch number returns that epoch's batches, so it is the ``batches`` factory
``finetune`` expects.

Images and labels are discovered, checked and read as for evaluation (:class:`sweep.data.Dataset`
with ``labels=True``: sorted paths, YOLOv5's image checks, ``read_labels`` via ``label_path``,
skipped images excluded). Per sample (all YOLOv5's definitions; the code is ours):

``augment=True``
  * with probability ``mosaic``: a 4-image mosaic (:func:`mosaic4`): a ``2S x 2S`` grey (114)
    canvas, centre drawn uniformly in ``[S/2, 3S/2)`` per axis, the sample and 3 images drawn
    with replacement, shuffled, placed top-left / top-right / bottom-left / bottom-right of the
    centre (each image resized so its long side is S, INTER_LINEAR), boxes clipped to the
    canvas; then :func:`random_perspective` with border ``-S/2`` (output ``S x S``). Otherwise the
    image is letterboxed to ``S x S`` (upscaling allowed) and :func:`random_perspective` runs
    without border.
  * :func:`random_perspective`: ``M = T S R P C`` (centre, perspective ``perspective``, rotation
    ``degrees`` and scale ``1 +/- scale``, shear ``shear`` degrees, translation ``0.5 +/-
    translate`` of the output size), grey 114 border; boxes mapped by their 4 corners, clipped,
    and kept by :func:`box_candidates` (w, h > 2 px, area > 10% of the scaled original, aspect
    ratio < 100).
  * with probability ``mixup``: blended with a second mosaic sample (ratio ~ Beta(32, 32)), boxes
    of both kept.
  * boxes to normalised xywh clipped to the image (``eps`` 1e-3), then :func:`augment_hsv` (gains
    ``hsv_h``, ``hsv_s``, ``hsv_v``: hue rotated, saturation and value scaled, by look-up tables),
    vertical flip with probability ``flipud``, horizontal flip with probability ``fliplr``.
``augment=False``
  the plain val-style image: long side resized to S (INTER_AREA when shrinking), letterboxed to
  ``S x S`` without upscaling (:func:`sweep.data.dataset.letterbox`), boxes mapped with it.

``copy_paste`` needs segment labels and is refused when > 0.

Randomness: each epoch's sample order is a permutation drawn from ``(seed, epoch)`` (``shuffle``),
and every sample's random numbers come from its own generator seeded by ``(seed, epoch,
position)``: the batches are a pure function of the files, the hyperparameters, the seed and the
epoch, whatever the number of ``workers`` threads.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from sweep.data.dataset import Dataset, letterbox, load_image
from sweep.config.hyp import resolve_hyp

__all__ = ["TrainLoader", "mosaic4", "random_perspective", "box_candidates", "augment_hsv", "xywhn_to_xyxy",
           "xyxy_to_xywhn", "collate"]

GREY = (114, 114, 114)


# --------------------------------------------------------------------------- box helpers


def xywhn_to_xyxy(boxes: np.ndarray, w: float, h: float, padw: float = 0.0, padh: float = 0.0) -> np.ndarray:
    """Normalised ``cx cy w h`` [n, 4] -> pixel ``x1 y1 x2 y2`` for an image of ``w x h`` placed at ``(padw, padh)``."""
    out = np.empty_like(boxes)
    out[:, 0] = w * (boxes[:, 0] - boxes[:, 2] / 2) + padw
    out[:, 1] = h * (boxes[:, 1] - boxes[:, 3] / 2) + padh
    out[:, 2] = w * (boxes[:, 0] + boxes[:, 2] / 2) + padw
    out[:, 3] = h * (boxes[:, 1] + boxes[:, 3] / 2) + padh
    return out


def xyxy_to_xywhn(boxes: np.ndarray, w: int, h: int, eps: float = 1e-3) -> np.ndarray:
    """Pixel ``x1 y1 x2 y2`` [n, 4] clipped to ``[0, w - eps] x [0, h - eps]`` -> normalised ``cx cy w h``."""
    b = boxes.copy()
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w - eps)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h - eps)
    out = np.empty_like(b)
    out[:, 0] = (b[:, 0] + b[:, 2]) / 2 / w
    out[:, 1] = (b[:, 1] + b[:, 3]) / 2 / h
    out[:, 2] = (b[:, 2] - b[:, 0]) / w
    out[:, 3] = (b[:, 3] - b[:, 1]) / h
    return out


def box_candidates(before: np.ndarray, after: np.ndarray, wh_thr: float = 2, ar_thr: float = 100,
                   area_thr: float = 0.1, eps: float = 1e-16) -> np.ndarray:
    """Boxes worth keeping after a warp: ``before`` (scaled originals) and ``after``, both ``[n, 4]`` xyxy.

    Kept: width and height > ``wh_thr`` pixels, area > ``area_thr`` of the scaled original's, aspect
    ratio < ``ar_thr``.
    """
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


# --------------------------------------------------------------------------- augmentations


def random_perspective(img: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *, degrees: float = 0.0,
                       translate: float = 0.1, scale: float = 0.5, shear: float = 0.0, perspective: float = 0.0,
                       border: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Random affine (or perspective) warp of ``img`` (HWC) and its ``labels`` [n, 5] (cls, pixel xyxy).

    Output size: the input size plus ``2 * border`` per axis (border -S/2 turns a 2S mosaic into S).
    """
    height, width = img.shape[0] + border[0] * 2, img.shape[1] + border[1] * 2
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -img.shape[1] / 2, -img.shape[0] / 2
    persp = np.eye(3)
    persp[2, 0], persp[2, 1] = rng.uniform(-perspective, perspective), rng.uniform(-perspective, perspective)
    rot = np.eye(3)
    angle, s = rng.uniform(-degrees, degrees), rng.uniform(1 - scale, 1 + scale)
    rot[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=s)
    sh = np.eye(3)
    sh[0, 1] = math.tan(rng.uniform(-shear, shear) * math.pi / 180)
    sh[1, 0] = math.tan(rng.uniform(-shear, shear) * math.pi / 180)
    tr = np.eye(3)
    tr[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * width
    tr[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * height
    M = tr @ sh @ rot @ persp @ centre
    if border[0] != 0 or border[1] != 0 or (M != np.eye(3)).any():
        if perspective:
            img = cv2.warpPerspective(img, M, dsize=(width, height), borderValue=GREY)
        else:
            img = cv2.warpAffine(img, M[:2], dsize=(width, height), borderValue=GREY)
    n = len(labels)
    if n:
        corners = np.ones((n * 4, 3))
        corners[:, :2] = labels[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)  # x1y1 x2y2 x1y2 x2y1
        corners = corners @ M.T
        xy = (corners[:, :2] / corners[:, 2:3] if perspective else corners[:, :2]).reshape(n, 8)
        xs, ys = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
        new = np.stack((xs.min(1), ys.min(1), xs.max(1), ys.max(1)), 1)
        new[:, [0, 2]] = new[:, [0, 2]].clip(0, width)
        new[:, [1, 3]] = new[:, [1, 3]].clip(0, height)
        keep = box_candidates(labels[:, 1:5] * s, new, area_thr=0.10)
        labels = labels[keep]
        labels[:, 1:5] = new[keep]
    return img, labels


def augment_hsv(img: np.ndarray, rng: np.random.Generator, hgain: float = 0.5, sgain: float = 0.5,
                vgain: float = 0.5) -> None:
    """Random hue/saturation/value change of a BGR uint8 image, in place (YOLOv5's look-up tables)."""
    if not (hgain or sgain or vgain):
        return
    r = rng.uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(0, 256, dtype=r.dtype)
    lut_hue = ((x * r[0]) % 180).astype(img.dtype)
    lut_sat = np.clip(x * r[1], 0, 255).astype(img.dtype)
    lut_val = np.clip(x * r[2], 0, 255).astype(img.dtype)
    hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=img)


def mosaic4(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], size: int, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """Four images (HWC, long side ``size``) and their labels [n, 5] (cls + normalised xywh) on a
    ``2 size`` grey canvas around a random centre; returns (canvas, labels [m, 5] cls + pixel xyxy)."""
    s = size
    xc, yc = (int(rng.uniform(s // 2, 2 * s - s // 2)) for _ in range(2))
    canvas = np.full((2 * s, 2 * s, images[0].shape[2]), 114, dtype=np.uint8)
    out = []
    for i, (img, lb) in enumerate(zip(images, labels)):
        h, w = img.shape[:2]
        if i == 0:    # top left: the image's bottom-right corner at the centre
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
        elif i == 1:  # top right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
            x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
        elif i == 2:  # bottom left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(2 * s, yc + h)
            x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
        else:         # bottom right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h)
            x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
        canvas[y1a:y2a, x1a:x2a] = img[y1b:y2b, x1b:x2b]
        padw, padh = x1a - x1b, y1a - y1b
        lb = lb.copy()
        if len(lb):
            lb[:, 1:] = xywhn_to_xyxy(lb[:, 1:], w, h, padw, padh)
        out.append(lb)
    boxes = np.concatenate(out, 0) if out else np.zeros((0, 5), np.float32)
    np.clip(boxes[:, 1:], 0, 2 * s, out=boxes[:, 1:])
    return canvas, boxes


def collate(samples: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples (CHW RGB uint8, labels [n, 5]) -> (images [B, 3, S, S] uint8, targets [N, 6] with the image index)."""
    images = torch.from_numpy(np.stack([s[0] for s in samples]))
    rows = [np.concatenate([np.full((len(lb), 1), i, np.float32), lb.astype(np.float32)], 1)
            for i, (_, lb) in enumerate(samples)]
    targets = torch.from_numpy(np.concatenate(rows, 0)) if rows else torch.zeros(0, 6)
    return images, targets.reshape(-1, 6)


# --------------------------------------------------------------------------- the loader


class _Epoch:
    """One epoch's batches: iterable once per ``iter()``, with ``len()`` = number of batches."""

    def __init__(self, loader: "TrainLoader", epoch: int):
        self.loader, self.epoch = loader, epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.loader._iterate(self.epoch)


class TrainLoader:
    """Training batches of a labeled YOLO-format image set (see the module doc).

    ``source``: an image folder, a ``.txt`` list or a list of those (labels beside them under
    ``labels/``). ``imgsz``: the square training size S (a multiple of 32). ``batch``: images per
    batch (the last batch may be smaller). ``hyp``: overrides of
    :data:`sweep.config.hyp.HYP_SCRATCH_LOW` (augmentation keys). ``augment``: YOLOv5's training
    augmentation, else plain letterboxed images. ``shuffle``: a new sample order every epoch.
    ``names``: class names (class ids are then checked). ``limit``: keep the first N images.
    ``cache``: keep decoded, resized images in memory (about S*S*3*0.75 bytes per image).
    """

    def __init__(self, source: str | Path | Sequence[str | Path], *, imgsz: int = 640, batch: int = 16,
                 hyp: Mapping[str, Any] | None = None, augment: bool = True, shuffle: bool = True, seed: int = 0,
                 workers: int = 2, names: Any = None, limit: int | None = None, cache: bool = False):
        if imgsz % 32:
            raise ValueError(f"imgsz={imgsz} must be a multiple of 32")
        if batch < 1:
            raise ValueError(f"batch={batch} must be >= 1")
        self.hyp = resolve_hyp(hyp)
        if self.hyp["copy_paste"] > 0:
            raise ValueError("copy_paste > 0 needs segment labels, which this loader does not read; use copy_paste=0")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = Dataset(source, names, imgsz=imgsz, batch=batch, rect=False, labels=True, limit=limit,
                         workers=workers)
        self.warnings = [str(w.message) for w in caught]
        self.files: list[str] = list(ds.files)
        self.labels: list[np.ndarray] = [lb.astype(np.float32) for lb in ds.labels]
        self.skipped = list(ds.skipped)
        self.imgsz, self.batch_size, self.augment, self.shuffle = int(imgsz), int(batch), bool(augment), bool(shuffle)
        self.seed, self.workers = int(seed), max(0, int(workers))
        self._cache: dict[int, tuple[np.ndarray, tuple[int, int]]] | None = {} if cache else None

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    @property
    def instances(self) -> int:
        return int(sum(len(lb) for lb in self.labels))

    def __call__(self, epoch: int) -> _Epoch:
        return self.epoch(epoch)

    def epoch(self, epoch: int) -> _Epoch:
        """Epoch ``epoch``'s batches (deterministic given the seed)."""
        return _Epoch(self, int(epoch))

    def order(self, epoch: int) -> np.ndarray:
        """Sample order (file indices) of an epoch."""
        n = len(self.files)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(n)

    # ---- one image
    def _load(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """BGR image with its long side resized to S (INTER_LINEAR when augmenting, as YOLOv5 trains), and (h0, w0)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        path = self.files[index]
        if self.augment:
            img = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"OpenCV cannot decode image {path}")
            h0, w0 = img.shape[:2]
            r = self.imgsz / max(h0, w0)
            if r != 1:
                img = cv2.resize(img, (math.ceil(w0 * r), math.ceil(h0 * r)), interpolation=cv2.INTER_LINEAR)
        else:
            img, (h0, w0), _ = load_image(path, self.imgsz)
        if self._cache is not None:
            self._cache[index] = (img, (h0, w0))
        return img, (h0, w0)

    def _mosaic(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        picks = [index] + [int(i) for i in rng.integers(0, len(self.files), 3)]
        rng.shuffle(picks)
        images = [self._load(i)[0] for i in picks]
        img, labels = mosaic4(images, [self.labels[i] for i in picks], self.imgsz, rng)
        h = self.hyp
        return random_perspective(img, labels, rng, degrees=h["degrees"], translate=h["translate"], scale=h["scale"],
                                  shear=h["shear"], perspective=h["perspective"],
                                  border=(-self.imgsz // 2, -self.imgsz // 2))

    def sample(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One training sample: (CHW RGB uint8 [3, S, S], labels float32 [n, 5] cls + normalised xywh)."""
        h, s = self.hyp, self.imgsz
        if self.augment and rng.random() < h["mosaic"]:
            img, labels = self._mosaic(index, rng)
            if rng.random() < h["mixup"]:
                img2, labels2 = self._mosaic(int(rng.integers(0, len(self.files))), rng)
                r = rng.beta(32.0, 32.0)
                img = (img * r + img2 * (1 - r)).astype(np.uint8)
                labels = np.concatenate((labels, labels2), 0)
        else:
            img, _ = self._load(index)
            hh, ww = img.shape[:2]
            img, ratio, (dw, dh) = letterbox(img, (s, s), scaleup=self.augment)
            labels = self.labels[index].copy()
            if len(labels):
                labels[:, 1:] = xywhn_to_xyxy(labels[:, 1:], ratio * ww, ratio * hh, dw, dh)
            if self.augment:
                img, labels = random_perspective(img, labels, rng, degrees=h["degrees"], translate=h["translate"],
                                                 scale=h["scale"], shear=h["shear"], perspective=h["perspective"])
        labels = labels.astype(np.float32).reshape(-1, 5)
        if len(labels):
            labels[:, 1:5] = xyxy_to_xywhn(labels[:, 1:5], img.shape[1], img.shape[0])
        if self.augment:
            img = np.ascontiguousarray(img)
            augment_hsv(img, rng, h["hsv_h"], h["hsv_s"], h["hsv_v"])
            if rng.random() < h["flipud"]:
                img = np.flipud(img)
                labels[:, 2] = 1 - labels[:, 2]
            if rng.random() < h["fliplr"]:
                img = np.fliplr(img)
                labels[:, 1] = 1 - labels[:, 1]
        chw = np.ascontiguousarray(img.transpose(2, 0, 1)[::-1])  # HWC BGR -> CHW RGB
        return chw, labels

    def _sample_at(self, epoch: int, position: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sample(index, np.random.default_rng([self.seed, epoch, position]))

    def _iterate(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order(epoch)
        bs = self.batch_size
        chunks = [list(enumerate(order[k:k + bs].tolist(), start=k)) for k in range(0, len(order), bs)]
        if self.workers == 0:
            for chunk in chunks:
                yield collate([self._sample_at(epoch, p, i) for p, i in chunk])
            return
        with ThreadPoolExecutor(self.workers) as pool:
            pending = [[pool.submit(self._sample_at, epoch, p, i) for p, i in chunk] for chunk in chunks[:2]]
            nxt = 2
            try:
                while pending:
                    futures = pending.pop(0)
                    if nxt < len(chunks):  # keep one batch decoding ahead
                        pending.append([pool.submit(self._sample_at, epoch, p, i) for p, i in chunks[nxt]])
                        nxt += 1
                    yield collate([f.result() for f in futures])
            finally:
                for futures in pending:
                    for f in futures:
                        f.cancel()
