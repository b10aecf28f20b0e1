"""YOLO-format datasets read and preprocessed exactly as YOLOv5 ``val.py`` (v7.0) does.

What this module reproduces (our own code; the formulas are YOLOv5's):

* File discovery: an images folder (searched recursively), a ``.txt`` list file or a list of
  those; only image suffixes YOLOv5 accepts; sorted by path string. Labels: the last
  ``/images/`` of the image path replaced by ``/labels/``, suffix ``.txt``.
* Image check (YOLOv5's ``verify_image_label``): PIL opens and verifies the file, its size is
  EXIF-corrected the way YOLOv5 does it (orientations 6 and 8 swap width and height), both
  sides must be >= 10 pixels and the PIL format must be an accepted one. A JPEG without its
  end-of-image marker is fully decoded with PIL; if that fails the image is skipped.
  Skipped images are excluded everywhere (like YOLOv5's "ignoring corrupt image/label").
* Labels: ``cls cx cy w h`` per line (polygon lines with more than 6 values are turned into
  their bounding box, as YOLOv5 does), parsed to float32; exact duplicate rows are removed
  the way YOLOv5 removes them (``np.unique`` over rows, which also sorts them).
* Rectangular batches (``rect=True, pad=0.5``): order = ``np.argsort(h / w)`` (the very call
  val.py makes, see :func:`rect_order`), per-batch shape from :func:`rect_batch_shapes`.
* Per image: ``cv2.imdecode`` (what YOLOv5 v7.0's patched ``cv2.imread`` does; EXIF orientation
  applied), resize so the long side is ``imgsz`` (``ceil``, INTER_AREA when shrinking,
  INTER_LINEAR when enlarging), :func:`letterbox` to the batch shape without upscaling, colour
  114, then BGR->RGB, HWC->CHW, uint8.

Everything that is yielded per batch (:class:`Batch`) is a pure function of the file list, the
file contents, ``imgsz``, ``stride``, ``pad``, ``batch`` and ``rect``, so it can be cached.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
import torch
import yaml
from PIL import Image

LOGGER = logging.getLogger(__name__)

#: Image suffixes (lower case, no dot) that YOLOv5 v7.0 accepts.
IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm")

#: COCO's 91-id category for each of the 80 YOLO class indices (the standard COCO table).
COCO80_TO_91: list[int] = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44,
    46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65,
    67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
]

PAD_COLOR = (114, 114, 114)
#: Bumped whenever a change here alters the yielded batches (part of Dataset.cache_key()).
PREPROCESS_VERSION = 1
_EXIF_ORIENTATION = 274  # the EXIF tag id of "Orientation"

ImageId = Union[int, str]
RatioPad = tuple[tuple[float, float], tuple[float, float]]


class DataError(ValueError):
    """Unusable dataset input; the message names the file (and line) or folder at fault."""


class DataWarning(UserWarning):
    """Something in the dataset was skipped or repaired (skipped images, duplicate labels)."""


@dataclass(frozen=True)
class Skipped:
    """An image left out of the dataset and why."""

    path: str
    reason: str


@dataclass
class Batch:
    """One preprocessed batch, in rect order.

    ``images``: ``torch.uint8 [B, 3, H, W]`` RGB, ``(H, W)`` = the batch shape.
    ``shapes0``: ``(h0, w0)`` of each decoded original image.
    ``ratio_pad``: ``((h / h0, w / w0), (padw, padh))`` per image, where ``(h, w)`` is the size
    after the long-side resize and ``padw/padh`` the (possibly fractional) letterbox padding on
    each side, as val.py passes them to ``scale_boxes``.
    """

    images: torch.Tensor
    image_ids: list[ImageId]
    paths: list[str]
    shapes0: list[tuple[int, int]]
    ratio_pad: list[RatioPad]
    index: int = 0  # batch number in the iteration order


# --------------------------------------------------------------------------- file discovery


def _is_image(path: str) -> bool:
    return path.rsplit(".", 1)[-1].lower() in IMG_FORMATS


def list_image_files(source: str | Path | Sequence[str | Path]) -> list[str]:
    """Image files of ``source`` sorted by path string, as YOLOv5 lists them.

    ``source``: a folder (searched recursively for ``*.*``), a ``.txt`` file listing images
    (``./x`` entries are relative to the list file's folder, as in YOLOv5; other relative
    entries are resolved against it too, where YOLOv5 would use the working directory), or a
    list of those. Raises DataError for a missing path and when no image is found.
    """
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    found: list[str] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            found += glob.glob(str(p / "**" / "*.*"), recursive=True)
        elif p.is_file():
            parent = p.parent
            for line in p.read_text().strip().splitlines():
                line = line.strip()
                if not line:
                    continue
                entry = Path(line[2:] if line.startswith("./") else line).expanduser()
                found.append(str(entry if entry.is_absolute() else parent / entry))
        else:
            raise DataError(f"dataset path does not exist: {p}")
    files = sorted(f for f in found if _is_image(f))
    if not files:
        raise DataError(f"no images found in {', '.join(str(s) for s in sources)} "
                        f"(accepted suffixes: {', '.join(IMG_FORMATS)})")
    return files


def label_path(image_path: str | Path) -> str:
    """The YOLO label file of an image: last ``/images/`` -> ``/labels/``, suffix -> ``.txt``."""
    s = str(image_path)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return sb.join(s.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt"


def image_id_from_path(path: str | Path) -> ImageId:
    """``int(stem)`` when the file stem is numeric (``str.isnumeric``, as val.py), else the stem."""
    stem = Path(path).stem
    return int(stem) if stem.isnumeric() else stem


# --------------------------------------------------------------------------- checks and labels


class _Corrupt(Exception):
    pass


def exif_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of a PIL image, swapped when its EXIF orientation is 6 or 8.

    Exactly YOLOv5's correction: only orientations 6/8 (not the transposing 5/7), and only via
    ``_getexif()`` (JPEG-style EXIF); any failure means no correction.
    """
    s = img.size
    try:
        rotation = dict(img._getexif().items())[_EXIF_ORIENTATION]  # type: ignore[attr-defined]
        if rotation in (6, 8):
            s = (s[1], s[0])
    except Exception:
        pass
    return s


def verify_image(path: str) -> tuple[int, int]:
    """Check an image as YOLOv5 does before using it; returns the EXIF-corrected ``(h, w)``.

    Raises ``_Corrupt(reason)`` for an image YOLOv5 would ignore.
    """
    try:
        with Image.open(path) as im:
            im.verify()
            w, h = exif_size(im)
            fmt = (im.format or "").lower()
    except Exception as e:  # unreadable, not an image, truncated header...
        raise _Corrupt(f"unreadable image ({type(e).__name__}: {e})") from None
    if w <= 9 or h <= 9:
        raise _Corrupt(f"image size {(w, h)} < 10 pixels")
    if fmt not in IMG_FORMATS:
        raise _Corrupt(f"invalid image format {fmt or 'unknown'}")
    if fmt in ("jpg", "jpeg"):
        with open(path, "rb") as f:
            f.seek(-2, 2)
            complete = f.read() == b"\xff\xd9"
        if not complete:
            # YOLOv5 re-saves such a file in place when PIL can decode it and ignores it when
            # it cannot. We never write into datasets: decodable -> used as is, else skipped.
            try:
                with Image.open(path) as im:
                    im.load()
            except Exception as e:
                raise _Corrupt(f"truncated JPEG ({type(e).__name__}: {e})") from None
            LOGGER.warning("%s: JPEG without end-of-image marker, decoded as is "
                           "(YOLOv5 would re-save it)", path)
    return h, w


def _segments_to_boxes(rows: list[tuple[int, list[str]]], path: str) -> np.ndarray:
    out = []
    for ln, row in rows:
        try:
            seg = np.array(row[1:], dtype=np.float32).reshape(-1, 2)
        except ValueError:
            raise DataError(f"{path}:{ln}: malformed polygon label {' '.join(row)!r} "
                            "(expected cls x1 y1 x2 y2 ...)") from None
        x, y = seg.T
        x1, y1, x2, y2 = x.min(), y.min(), x.max(), y.max()
        out.append([np.float32(row[0]), (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
    return np.array(out, dtype=np.float32)


def read_labels(path: str | Path, nc: int | None = None) -> tuple[np.ndarray, int, str | None]:
    """Read one YOLO label file.

    Returns ``(labels float32 [n, 5] (cls, cx, cy, w, h), duplicates_removed, problem)``;
    a missing file gives an empty array. ``problem`` is a reason string when YOLOv5 would
    ignore the whole image (negative or > 1 coordinates); the caller skips that image.
    Raises DataError naming file and line for a malformed line (not numbers, wrong column
    count, non-integer class) or a class id outside ``[0, nc)`` when ``nc`` is given.
    """
    path = str(path)
    if not os.path.isfile(path):
        return np.zeros((0, 5), dtype=np.float32), 0, None
    with open(path) as f:
        text = f.read()
    rows = [(ln, line.split()) for ln, line in enumerate(text.splitlines(), 1) if line.split()]
    if not rows:
        return np.zeros((0, 5), dtype=np.float32), 0, None
    for ln, row in rows:
        try:
            vals = [float(v) for v in row]
        except ValueError:
            raise DataError(f"{path}:{ln}: malformed label line {' '.join(row)!r} "
                            "(expected numbers: cls cx cy w h)") from None
        if not all(math.isfinite(v) for v in vals):
            raise DataError(f"{path}:{ln}: non-finite value in label line {' '.join(row)!r}")
        if len(row) < 5 or len(row) == 6:
            raise DataError(f"{path}:{ln}: label line has {len(row)} values, expected 5 "
                            f"(cls cx cy w h): {' '.join(row)!r}")
        c = vals[0]
        if c != int(c) or c < 0:
            raise DataError(f"{path}:{ln}: class id {row[0]!r} is not a non-negative integer")
        if nc is not None and int(c) >= nc:
            raise DataError(f"{path}:{ln}: class id {int(c)} out of range: the dataset has "
                            f"{nc} classes (0..{nc - 1})")
    if any(len(row) > 6 for _, row in rows):  # polygons (YOLOv5: then every line is one)
        lb = _segments_to_boxes(rows, path)
    else:
        lb = np.array([row for _, row in rows], dtype=np.float32)
    if (lb < 0).any():
        return lb, 0, f"negative label values {lb[lb < 0].tolist()} in {path}"
    if (lb[:, 1:] > 1).any():
        return lb, 0, f"non-normalized or out of bounds coordinates {lb[:, 1:][lb[:, 1:] > 1].tolist()} in {path}"
    n = len(lb)
    _, keep = np.unique(lb, axis=0, return_index=True)
    if len(keep) < n:
        lb = lb[keep]  # YOLOv5 keeps the np.unique order (rows sorted)
    return lb, n - len(lb), None


# --------------------------------------------------------------------------- geometry


def rect_order(aspect_ratios: np.ndarray) -> np.ndarray:
    """The rect-batching order: ``np.argsort(h / w)`` with NumPy's default kind, as val.py.

    That sort is not stable: the order of images with equal aspect ratios (which decides their
    batch, hence their padding) is whatever this NumPy build's quicksort gives (NumPy >= 2 uses
    SIMD sorting networks on AVX2/AVX-512 CPUs). Using the same call keeps us identical to a
    val.py run with the same NumPy on the same CPU; results across machines may differ there.
    """
    return np.asarray(aspect_ratios, dtype=np.float64).argsort()


def rect_batch_shapes(aspect_ratios_sorted: np.ndarray, batch: int, imgsz: int,
                      stride: int, pad: float) -> np.ndarray:
    """Letterbox shape ``[h, w]`` of each batch, as val.py computes it (``rect=True``).

    ``aspect_ratios_sorted``: ``h / w`` per image in rect order. Per batch of ``batch``
    images: max ratio < 1 -> ``[maxr, 1]``; min ratio > 1 -> ``[1, 1 / minr]``; else ``[1, 1]``;
    then ``ceil(s * imgsz / stride + pad).astype(int) * stride``. Returns int ``[nb, 2]``.
    """
    ar = np.asarray(aspect_ratios_sorted, dtype=np.float64)
    if ar.size == 0:
        return np.zeros((0, 2), dtype=int)
    bi = np.floor(np.arange(len(ar)) / batch).astype(int)
    nb = bi[-1] + 1
    shapes: list[list[float]] = [[1, 1]] * nb
    for i in range(nb):
        ari = ar[bi == i]
        mini, maxi = ari.min(), ari.max()
        if maxi < 1:
            shapes[i] = [maxi, 1]
        elif mini > 1:
            shapes[i] = [1, 1 / mini]
    return np.ceil(np.array(shapes) * imgsz / stride + pad).astype(int) * stride


def letterbox(im: np.ndarray, new_shape: tuple[int, int] | Sequence[int],
              color: tuple[int, int, int] = PAD_COLOR, scaleup: bool = False
              ) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Fit ``im`` (HWC) into ``new_shape = (H, W)``: val.py's letterbox with ``auto=False``.

    ``r = min(H / h, W / w)`` (capped at 1 unless ``scaleup``); resized (INTER_LINEAR) to
    ``(round(w r), round(h r))`` only when that differs; padding ``dw = (W - w') / 2`` split as
    ``left = round(dw - 0.1)``, ``right = round(dw + 0.1)`` (same for top/bottom; Python's
    round, half to even) in constant ``color``. Returns ``(image, r, (dw, dh))``.
    """
    shape = im.shape[:2]
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    if not scaleup:
        r = min(r, 1.0)
    new_unpad = int(round(shape[1] * r)), int(round(shape[0] * r))
    dw = (new_shape[1] - new_unpad[0]) / 2
    dh = (new_shape[0] - new_unpad[1]) / 2
    if shape[::-1] != new_unpad:
        im = cv2.resize(im, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return im, float(r), (float(dw), float(dh))


def load_image(path: str, imgsz: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Decode BGR (EXIF orientation applied) and resize so the long side is ``imgsz``.

    Returns ``(image HWC BGR uint8, (h0, w0), (h, w))``. Resize target
    ``(ceil(w0 r), ceil(h0 r))`` with ``r = imgsz / max(h0, w0)``, INTER_AREA when ``r < 1``,
    INTER_LINEAR when ``r > 1``, untouched when ``r == 1`` (val.py v7.0).
    """
    im = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    if im is None:
        raise DataError(f"OpenCV cannot decode image {path}")
    h0, w0 = im.shape[:2]
    r = imgsz / max(h0, w0)
    if r != 1:
        interp = cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR
        im = cv2.resize(im, (math.ceil(w0 * r), math.ceil(h0 * r)), interpolation=interp)
    return im, (h0, w0), im.shape[:2]


def preprocess_into(path: str, imgsz: int, shape: Sequence[int], out: np.ndarray | None = None
                    ) -> tuple[np.ndarray, tuple[int, int], RatioPad]:
    """Load + letterbox one image to ``shape = (H, W)`` and write it as RGB CHW uint8.

    ``out``: optional ``uint8 [3, H, W]`` array to fill (e.g. a slice of the batch tensor).
    Returns ``(chw, (h0, w0), ((h / h0, w / w0), (padw, padh)))``.
    """
    im, (h0, w0), (h, w) = load_image(path, imgsz)
    im, _, pad = letterbox(im, (int(shape[0]), int(shape[1])))
    chw = im.transpose(2, 0, 1)[::-1]  # HWC -> CHW, BGR -> RGB
    if out is None:
        out = np.ascontiguousarray(chw)
    else:
        np.copyto(out, chw)
    return out, (h0, w0), ((h / h0, w / w0), pad)


# --------------------------------------------------------------------------- dataset


def _names_list(names: Any) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, dict):
        keys = sorted(int(k) for k in names)
        if keys != list(range(len(keys))):
            raise DataError(f"class names must be indexed 0..n-1, got keys {keys}")
        return [str(names[k] if k in names else names[str(k)]) for k in keys]
    return [str(n) for n in names]


class Dataset:
    """A YOLO-format image set, checked, with its labels and rect batches.

    Per-image attributes are in file order (sorted paths, skipped images removed):
    ``files``, ``image_ids``, ``shapes0`` (EXIF-corrected ``(h, w)`` from the file header, used
    for the aspect ratios and the ground truth), ``labels`` (float32 ``[n, 5]`` cls cx cy w h
    normalized; empty when ``labels=False``). ``order`` is the iteration order (rect order, or
    file order when ``rect=False``), ``batch_shapes[k]`` the ``[H, W]`` of batch ``k`` of that
    order. ``skipped`` lists the images left out with their reasons.

    ``names``: class names (list, or dict index -> name); when given, class ids are checked
    against ``len(names)``. ``labels=False`` reads no label files (unlabeled calibration data).
    ``workers``: decoding threads for :meth:`iter_batches` (0 = in the calling thread).
    ``annotations``/``coco80_to_91`` are carried for the evaluator (official COCO JSON).
    """

    def __init__(self, source: str | Path | Sequence[str | Path], names: Any = None, *,
                 imgsz: int = 640, batch: int = 32, stride: int = 32, pad: float = 0.5,
                 rect: bool = True, limit: int | None = None, workers: int = 2,
                 labels: bool = True, annotations: str | Path | None = None,
                 coco80_to_91: bool = False) -> None:
        if batch < 1:
            raise ValueError(f"batch={batch} must be >= 1")
        self.source = source
        self.names = _names_list(names)
        self.imgsz, self.batch_size, self.stride, self.pad, self.rect = imgsz, batch, stride, pad, rect
        self.workers = max(0, int(workers))
        self.annotations = Path(annotations) if annotations else None
        self.coco80_to_91 = coco80_to_91
        nc = len(self.names) if self.names is not None else None

        candidates = list_image_files(source)
        if limit is not None:
            candidates = candidates[: int(limit)]

        checked = self._map(verify_image, candidates, catch=_Corrupt)
        self.skipped: list[Skipped] = []
        self.files: list[str] = []
        self.shapes0: list[tuple[int, int]] = []
        self.labels: list[np.ndarray] = []
        duplicates: list[str] = []
        n_label_files = 0
        for f, res in zip(candidates, checked):
            if isinstance(res, _Corrupt):
                self.skipped.append(Skipped(f, str(res)))
                continue
            if labels:
                lp = label_path(f)
                n_label_files += os.path.isfile(lp)
                lb, ndup, problem = read_labels(lp, nc)
                if problem:
                    self.skipped.append(Skipped(f, problem))
                    continue
                if ndup:
                    duplicates.append(f"{lp} ({ndup})")
            else:
                lb = np.zeros((0, 5), dtype=np.float32)
            self.files.append(f)
            self.shapes0.append(res)
            self.labels.append(lb)

        if self.skipped:
            listing = "; ".join(f"{s.path}: {s.reason}" for s in self.skipped[:10])
            more = f" (and {len(self.skipped) - 10} more)" if len(self.skipped) > 10 else ""
            warnings.warn(f"skipped {len(self.skipped)} of {len(candidates)} images: {listing}{more}",
                          DataWarning, stacklevel=2)
        if duplicates:
            warnings.warn(f"removed duplicate label rows in {len(duplicates)} files: "
                          + "; ".join(duplicates[:10]), DataWarning, stacklevel=2)
        if not self.files:
            raise DataError(f"dataset {source} has no usable images "
                            f"({len(self.skipped)} skipped, see the warnings)")
        if labels and n_label_files == 0:
            warnings.warn(f"no label files found for {source} (expected e.g. "
                          f"{label_path(self.files[0])})", DataWarning, stacklevel=2)

        self.image_ids: list[ImageId] = [image_id_from_path(f) for f in self.files]
        if len(set(self.image_ids)) != len(self.image_ids):
            seen: dict[ImageId, str] = {}
            for f, i in zip(self.files, self.image_ids):
                if i in seen:
                    raise DataError(f"image id {i!r} is not unique: {seen[i]} and {f}")
                seen[i] = f

        shapes = np.array(self.shapes0, dtype=np.float64)  # (h, w)
        self.aspect_ratios = shapes[:, 0] / shapes[:, 1]
        if rect:
            self.order = rect_order(self.aspect_ratios)
            self.batch_shapes = rect_batch_shapes(self.aspect_ratios[self.order], batch, imgsz,
                                                  stride, pad)
        else:
            self.order = np.arange(len(self.files))
            nb = math.ceil(len(self.files) / batch)
            self.batch_shapes = np.full((nb, 2), imgsz, dtype=int)

    # ---- small helpers
    @staticmethod
    def _map_one(fn, x, catch):
        try:
            return fn(x)
        except catch as e:
            return e

    def _map(self, fn, items: list, catch: type[BaseException]) -> list:
        if self.workers <= 1 or len(items) < 2:
            return [self._map_one(fn, x, catch) for x in items]
        with ThreadPoolExecutor(self.workers) as ex:
            return list(ex.map(lambda x: self._map_one(fn, x, catch), items))

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Alias of ``shapes0``: ``(h, w)`` per image in file order."""
        return self.shapes0

    @property
    def nc(self) -> int | None:
        return len(self.names) if self.names is not None else None

    @property
    def instances(self) -> int:
        """Number of label boxes over all images (val.py's "Instances")."""
        return int(sum(len(lb) for lb in self.labels))

    @property
    def num_batches(self) -> int:
        return len(self.batch_shapes)

    @property
    def nbytes(self) -> int:
        """Bytes of all decoded batches (uint8 ``[B, 3, H, W]`` each), known before decoding any."""
        return sum(len(self.batch_indices(k)) * 3 * int(h) * int(w) for k, (h, w) in enumerate(self.batch_shapes))

    def batch_indices(self, k: int) -> np.ndarray:
        """File-order indices of the images of batch ``k``."""
        return self.order[k * self.batch_size:(k + 1) * self.batch_size]

    def cache_key(self) -> str:
        """Hex digest identifying exactly what :meth:`iter_batches` yields (for an on-disk cache).

        Covers the preprocessing version, OpenCV's version (decode/resize results depend on it),
        imgsz/stride/pad/batch/rect, the iteration order and every file's real path (however the
        dataset folder was spelled: relative, absolute, through a link), size and mtime.
        """
        h = hashlib.sha256()
        h.update(json.dumps([PREPROCESS_VERSION, cv2.__version__, self.imgsz, self.stride,
                             self.pad, self.batch_size, self.rect, self.order.tolist()]).encode())
        for f in self.files:
            st = os.stat(f)
            h.update(f"\0{os.path.realpath(f)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return h.hexdigest()

    @property
    def class_map(self) -> list[int]:
        """Category id written for each class index: :data:`COCO80_TO_91` when
        ``coco80_to_91``, else the identity (val.py's ``list(range(1000))``, longer if needed)."""
        if self.coco80_to_91:
            return list(COCO80_TO_91)
        return list(range(max(self.nc or 0, 1000)))

    # ---- loading
    def _batch_job(self, k: int, pool: ThreadPoolExecutor | None):
        idx = self.batch_indices(k)
        h, w = (int(v) for v in self.batch_shapes[k])
        images = torch.empty((len(idx), 3, h, w), dtype=torch.uint8)
        arr = images.numpy()
        paths = [self.files[i] for i in idx]
        if pool is None:
            results = [preprocess_into(p, self.imgsz, (h, w), arr[j]) for j, p in enumerate(paths)]
            return self._make_batch(k, idx, images, results)
        futures = [pool.submit(preprocess_into, p, self.imgsz, (h, w), arr[j])
                   for j, p in enumerate(paths)]
        return (k, idx, images, futures)

    def _make_batch(self, k, idx, images, results) -> Batch:
        return Batch(images=images, image_ids=[self.image_ids[i] for i in idx],
                     paths=[self.files[i] for i in idx], shapes0=[r[1] for r in results],
                     ratio_pad=[r[2] for r in results], index=k)

    def load_batch(self, k: int) -> Batch:
        """Decode and letterbox batch ``k`` (in the calling thread)."""
        return self._batch_job(k, None)

    def iter_batches(self, prefetch: int = 1) -> Iterator[Batch]:
        """Yield every batch in order, decoding with ``workers`` threads.

        While the caller works on a batch, the next ``prefetch`` batches are being decoded, so
        at most ``1 + prefetch`` batches are held at a time (memory-bounded).
        """
        nb = self.num_batches
        if self.workers == 0:
            for k in range(nb):
                yield self.load_batch(k)
            return
        with ThreadPoolExecutor(self.workers) as pool:
            pending: list = []
            nxt = 0
            try:
                while nxt < nb and len(pending) < 1 + max(0, prefetch):
                    pending.append(self._batch_job(nxt, pool))
                    nxt += 1
                while pending:
                    k, idx, images, futures = pending.pop(0)
                    batch = self._make_batch(k, idx, images, [f.result() for f in futures])
                    yield batch  # the next `prefetch` batches decode meanwhile
                    del batch
                    if nxt < nb:
                        pending.append(self._batch_job(nxt, pool))
                        nxt += 1
            finally:
                for job in pending:
                    for f in job[3]:
                        f.cancel()


def _join(root: Path, spec: Any) -> Any:
    if isinstance(spec, (list, tuple)) or (hasattr(spec, "__iter__") and not isinstance(spec, (str, Path))):
        return [str(root / Path(str(s)).expanduser()) for s in spec]
    return str(root / Path(str(spec)).expanduser())


def iter_images(folder: str | Path | Sequence[str | Path], imgsz: int = 640, batch: int = 32,
                *, stride: int = 32, workers: int = 2, limit: int | None = None
                ) -> Iterator[Batch]:
    """Unlabeled images (e.g. calibration data) as square ``imgsz`` letterboxed batches.

    Same checks, decode and letterbox as :class:`Dataset` (``rect=False``, no label files);
    files in sorted order, unreadable ones skipped with a warning.
    """
    ds = Dataset(folder, imgsz=imgsz, batch=batch, stride=stride, rect=False, limit=limit,
                 workers=workers, labels=False)
    yield from ds.iter_batches()


# --------------------------------------------------------------------------- ground truth, yaml


def coco_ground_truth(dataset: Dataset) -> dict:
    """COCO-format ground truth (in memory) built from the dataset's YOLO labels.

    Every image appears in ``images`` (id, width, height, file_name), also those without
    labels. One annotation per label row: ``bbox`` = top-left ``[x, y, w, h]`` in pixels of the
    EXIF-corrected image size, ``area = w * h``, ``iscrowd = 0``, ``category_id`` = class
    index, ids from 1 (pycocotools treats id 0 as "unmatched"). ``categories``: one per class
    name (id = index); without names, one per class index up to the largest label.
    """
    images, anns = [], []
    ann_id = 1
    max_cls = -1
    for img_id, f, (h, w), lb in zip(dataset.image_ids, dataset.files, dataset.shapes0,
                                     dataset.labels):
        images.append({"id": img_id, "width": int(w), "height": int(h),
                       "file_name": os.path.basename(f)})
        for c, cx, cy, bw, bh in lb.astype(np.float64).tolist():
            pw, ph = bw * w, bh * h
            anns.append({"id": ann_id, "image_id": img_id, "category_id": int(c),
                         "bbox": [cx * w - pw / 2, cy * h - ph / 2, pw, ph],
                         "area": pw * ph, "iscrowd": 0})
            ann_id += 1
            max_cls = max(max_cls, int(c))
    names = dataset.names if dataset.names is not None else [str(i) for i in range(max_cls + 1)]
    categories = [{"id": i, "name": n, "supercategory": ""} for i, n in enumerate(names)]
    return {"info": {"description": f"YOLO labels of {dataset.source}"}, "licenses": [],
            "images": images, "annotations": anns, "categories": categories}


def load_ground_truth(dataset: Dataset, annotations: str | Path | None = None) -> tuple[dict, int]:
    """The COCO ground truth of ``dataset`` and its number of (non-crowd) instances.

    ``annotations``: an official COCO JSON (its instances counted over the dataset's images); without
    one, the ground truth is built from the YOLO labels (:func:`coco_ground_truth`).
    """
    if annotations is None:
        gt = coco_ground_truth(dataset)
        return gt, len(gt["annotations"])
    gt = json.loads(Path(annotations).read_text())
    ids = set(dataset.image_ids)
    return gt, sum(1 for a in gt["annotations"] if a["image_id"] in ids and not a.get("iscrowd", 0))


def load_data_yaml(path: str | Path) -> dict:
    """Read a YOLOv5 data yaml.

    Returns a dict with ``path`` (absolute; a relative ``path`` is resolved against the yaml's
    folder, a missing one means that folder), ``train``/``val``/``test`` made absolute against
    it (strings or lists; kept when absent), ``names`` as a list (a dict ``{i: name}`` is
    converted), ``nc``. Raises DataError for a missing file, no ``names`` or an ``nc`` that
    disagrees with ``names``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data yaml not found: {p}")
    with open(p) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise DataError(f"data yaml {p} is not a mapping")
    root = Path(str(d.get("path") or "")).expanduser()
    if not root.is_absolute():
        root = (p.parent / root).resolve()
    out = dict(d)
    out["path"] = str(root)
    for k in ("train", "val", "test"):
        if d.get(k):
            out[k] = _join(root, d[k])
    if "names" not in d:
        raise DataError(f"data yaml {p} has no 'names'")
    try:
        out["names"] = _names_list(d["names"])
    except DataError as e:
        raise DataError(f"data yaml {p}: {e}") from None
    if "nc" in d and int(d["nc"]) != len(out["names"]):
        raise DataError(f"data yaml {p}: nc={d['nc']} but {len(out['names'])} names")
    out["nc"] = len(out["names"])
    return out
