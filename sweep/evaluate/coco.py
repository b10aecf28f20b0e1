"""COCO bbox evaluation, an evaluator that owns its format (``reset`` / ``process`` / ``evaluate``).

The inference loop hands each batch's detections (columns: boxes in original-image pixels, scores,
classes) to ``process``; the evaluator keeps them as arrays, turns them into val.py's result values
(category ids, its bbox arithmetic and rounding) in one vectorised pass (:func:`coco_columns`) and
hands the backend an Nx7 array; dicts are built only for the predictions JSON. The evaluation itself
is a plain function (:func:`evaluate_columns`). Backends are a plain registry:
``EVALUATORS[name](ground_truth, rows_or_columns, image_ids) -> CocoResult``.

- ``pycocotools``: the reference implementation val.py uses.
- ``faster``: faster-coco-eval (C++ ``evaluateImg``/``accumulate``), same numbers, faster.

With ``bootstrap=N`` (> 0) the evaluation also gives a percentile confidence interval of every COCO
number from N image resamples (``sweep.evaluate.bootstrap``). That needs COCOeval's per-image matching
(``evalImgs``), which only pycocotools exposes (faster-coco-eval keeps it in C++), so the one
evaluation then runs through pycocotools whatever the backend; its numbers equal faster's (tested).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torchvision

from sweep.contract import COCO_METRICS
from sweep.evaluate import bootstrap as boot
from sweep.evaluate.ops import Detections

log = logging.getLogger(__name__)

STAT_NAMES = COCO_METRICS


@dataclass
class CocoResult:
    """The 12 standard numbers, per-class AP and the backend's printed summary."""

    stats: dict[str, float]
    per_class: pd.DataFrame
    summary: str = ""
    detections: int = 0
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (lo, hi), bootstrap only
    resamples: int = 0                                                          # bootstrap resamples behind them


def coco_rows(dets: torch.Tensor, image_id: int | str, class_map: Sequence[int]) -> list[dict]:
    """COCO result rows of one image, exactly as val.py writes its predictions JSON.

    ``dets``: ``[n, 6]`` (x1, y1, x2, y2, score, class) in original-image pixels.
    ``bbox`` = xyxy -> (cx, cy, w, h) then ``xy -= wh / 2`` (computed in the dets' dtype, like
    val.py, so it can differ from x1 in the last bit), each value ``round(v, 3)``;
    ``score = round(s, 5)``; ``category_id = class_map[int(cls)]``.
    """
    box = torchvision.ops.box_convert(dets[:, :4], "xyxy", "cxcywh")
    box[:, :2] -= box[:, 2:] / 2
    return [{"image_id": image_id,
             "category_id": class_map[int(p[5])],
             "bbox": [round(v, 3) for v in b],
             "score": round(p[4], 5)}
            for p, b in zip(dets.tolist(), box.tolist())]


def round_like_python(values: np.ndarray, ndigits: int) -> np.ndarray:
    """``round(v, ndigits)`` (Python's, correctly rounded) of every element of ``values``, as float64.

    ``np.round`` is ``rint(v * 10**n) / 10**n``: the product's rounding can carry a value lying within a
    few ulps of a halfway point to the other side of it, so it may pick the other neighbour than Python's
    exact decimal rounding. Elsewhere the integer is the same, and dividing it by ``10**n`` gives the
    double nearest to the decimal, as Python's ``round`` does. So: ``np.round`` everywhere, Python's
    ``round`` again for the few elements near a halfway point.
    """
    v = np.asarray(values, dtype=np.float64)
    out = np.round(v, ndigits)
    scaled = v * 10.0 ** ndigits
    off = np.abs(scaled - np.floor(scaled) - 0.5)
    near = np.flatnonzero(off <= np.maximum(1e-6, np.abs(scaled) * 1e-12))  # error bound ~ |scaled| * 2**-53
    if near.size:
        flat = out.reshape(-1)
        flat[near] = [round(x, ndigits) for x in v.reshape(-1)[near].tolist()]
    return out


def _id_array(ids: Sequence[Any]) -> np.ndarray:
    """Image ids as int64 when every one is an int (COCO), else as an object array of the ids themselves."""
    if all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        return np.asarray(ids, dtype=np.int64).reshape(-1)
    out = np.empty(len(ids), dtype=object)
    out[:] = list(ids)
    return out


@dataclass
class CocoColumns:
    """COCO result rows as columns, with val.py's values: ``image_id`` [n] (int64, or object for
    non-integer ids such as file stems), ``bbox`` float64 [n, 4] (x, y, w, h) rounded to 3 decimals,
    ``score`` float64 [n] rounded to 5, ``category_id`` int64 [n]. Picklable, numpy only.
    """

    image_id: np.ndarray
    bbox: np.ndarray
    score: np.ndarray
    category_id: np.ndarray

    def __len__(self) -> int:
        return int(self.score.shape[0])

    @classmethod
    def empty(cls) -> CocoColumns:
        return cls(np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))

    @classmethod
    def from_rows(cls, rows: Sequence[dict]) -> CocoColumns:
        """Columns of val.py-style result dicts (their values as they are)."""
        if not rows:
            return cls.empty()
        return cls(_id_array([r["image_id"] for r in rows]),
                   np.asarray([r["bbox"] for r in rows], dtype=np.float64).reshape(-1, 4),
                   np.asarray([r["score"] for r in rows], dtype=np.float64),
                   np.asarray([r["category_id"] for r in rows], dtype=np.int64))

    def rows(self) -> list[dict[str, Any]]:
        """The rows as val.py writes them (its keys, key order and Python types)."""
        return [{"image_id": i, "category_id": c, "bbox": b, "score": s}
                for i, c, b, s in zip(self.image_id.tolist(), self.category_id.tolist(), self.bbox.tolist(),
                                      self.score.tolist())]


Results = Union[list[dict[str, Any]], CocoColumns]  # what a backend takes: val.py's row dicts, or columns


def coco_columns(image_id: np.ndarray, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                 class_map: Sequence[int] | None = None) -> CocoColumns:
    """:func:`coco_rows` for many rows at once, as columns with the same values bit for bit.

    ``image_id`` [n]; ``boxes`` float32 [n, 4] xyxy original pixels; ``scores`` float32 [n]; ``classes``
    int [n] (class index; ``class_map[c]`` is its category id, ``None``: the identity).
    """
    # the bbox arithmetic of coco_rows in float32 with the same torch calls, then the rounding in float64
    box = torchvision.ops.box_convert(torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)).reshape(-1, 4),
                                      "xyxy", "cxcywh")
    box[:, :2] -= box[:, 2:] / 2
    classes = np.asarray(classes, dtype=np.int64)
    category = classes if class_map is None else np.asarray(class_map, dtype=np.int64)[classes]
    return CocoColumns(image_id, round_like_python(box.numpy(), 3),
                       round_like_python(np.asarray(scores, dtype=np.float32), 5), category)


def evaluate_columns(ground_truth: dict[str, Any], columns: CocoColumns, image_ids: Sequence[Any] | None = None,
                     backend: str = "pycocotools", bootstrap: int = 0) -> CocoResult:
    """The COCO evaluation of ``columns`` against ``ground_truth`` (a COCO-format dict): a plain function of
    picklable arguments, to run where it suits (e.g. another process).

    ``image_ids``: the images evaluated (``None``: every image of the ground truth); ``backend``: a key of
    :data:`EVALUATORS`; ``bootstrap`` > 0: also percentile intervals from that many image resamples (through
    pycocotools whatever the backend, see the module docstring).
    """
    ids = list(image_ids) if image_ids is not None else [im["id"] for im in ground_truth["images"]]
    if not len(columns):
        log.warning("no detections at all (every score below the threshold?): every COCO number is reported as 0")
        zero = {k: (0.0, 0.0) for k in STAT_NAMES} if bootstrap else {}  # every resample is 0 as well
        return CocoResult({k: 0.0 for k in STAT_NAMES}, _empty_per_class(ground_truth), "", 0, zero, bootstrap)
    if bootstrap:
        return with_interval(ground_truth, columns, ids, bootstrap)
    return EVALUATORS[backend](ground_truth, columns, ids)


@dataclass
class CocoEvaluator:
    """Collect detections as columns, then evaluate them against ``ground_truth``.

    ``ground_truth`` is a COCO-format dict (``images``, ``annotations``, ``categories``);
    ``image_ids`` restricts the evaluation to those images (val.py sets ``params.imgIds``
    to the dataset's images; ``None``: every image of the ground truth); ``class_map`` maps a
    class index to its category id (``None``: the identity).
    """

    ground_truth: dict[str, Any]
    backend: str = "pycocotools"
    image_ids: list[int | str] | None = None
    class_map: Sequence[int] | None = None
    bootstrap: int = 0   # image resamples for confidence intervals (0: none)
    _batches: list[tuple[list[Any], Detections]] = field(default_factory=list, init=False, repr=False)
    _columns: CocoColumns | None = field(default=None, init=False, repr=False)

    def reset(self) -> None:
        self._batches = []
        self._columns = None

    def process(self, batch: Any, detections: Detections | Sequence[torch.Tensor]) -> None:
        """``detections``: the batch's :class:`~sweep.evaluate.ops.Detections` (``image_index`` into
        ``batch.image_ids``), or one ``[n, 6]`` tensor (x1, y1, x2, y2, score, class) per image."""
        if not isinstance(detections, Detections):
            detections = Detections.from_tensors(detections)
        self._batches.append((list(batch.image_ids), detections))  # kept as they are: columns() converts once
        self._columns = None

    def columns(self) -> CocoColumns:
        """Everything collected, as val.py's result values in columns."""
        if self._columns is None:
            if not self._batches:
                return CocoColumns.empty()
            ids = _id_array([i for batch_ids, _ in self._batches for i in batch_ids])
            offsets = np.cumsum([0] + [len(b) for b, _ in self._batches[:-1]])
            pos = np.concatenate([off + d.image_index for off, (_, d) in zip(offsets, self._batches)])
            dets = [d for _, d in self._batches]
            self._columns = coco_columns(ids[pos], np.concatenate([d.boxes for d in dets]),
                                         np.concatenate([d.scores for d in dets]),
                                         np.concatenate([d.classes for d in dets]), self.class_map)
        return self._columns

    def predictions_json(self) -> str:
        """The rows as val.py's ``*_predictions.json`` (the only place they become dicts)."""
        return json.dumps(self.columns().rows())

    def evaluate(self) -> CocoResult:
        return evaluate_columns(self.ground_truth, self.columns(), self.image_ids, self.backend, self.bootstrap)


def _backend_input(gt: dict, columns: CocoColumns, ids: list) -> tuple[dict, np.ndarray, list]:
    """``(gt, Nx7 array, ids)`` for a backend's ``loadRes``: rows [image_id, x, y, w, h, score, category_id].

    Both backends turn the array into one dict per row with ``int(image_id)``, the floats as numpy float64
    (a subclass of ``float``: the same values as the JSON rows) and ``area = w * h`` as for the dicts.
    The array needs integer image ids: other ids (file stems) are replaced, in the ground truth too, by their
    1-based rank in sorted order, so COCOeval (which sorts ``imgIds``) visits the images in the same order.
    """
    gt_ids = [im["id"] for im in gt["images"]]
    if columns.image_id.dtype == object or _id_array(gt_ids).dtype == object:
        rank = {i: k + 1 for k, i in enumerate(sorted(set(gt_ids), key=lambda v: (isinstance(v, str), v)))}
        gt = {**gt, "images": [{**im, "id": rank[im["id"]]} for im in gt["images"]],
              "annotations": [{**a, "image_id": rank[a["image_id"]]} for a in gt.get("annotations", [])]}
        ids = [rank[i] for i in ids]
        image = np.asarray([rank[i] for i in columns.image_id.tolist()], dtype=np.float64)
    else:
        image = columns.image_id.astype(np.float64)
    arr = np.empty((len(columns), 7), dtype=np.float64)
    arr[:, 0] = image
    arr[:, 1:5] = columns.bbox
    arr[:, 5] = columns.score
    arr[:, 6] = columns.category_id
    return gt, arr, ids


def _cocoeval(coco_cls: Callable, eval_cls: Callable, gt: dict, rows: Results, ids: list) -> tuple[CocoResult, Any]:
    """The result and the COCOeval object (its ``evalImgs`` and ``params`` for a bootstrap)."""
    if isinstance(rows, CocoColumns):
        gt, rows, ids = _backend_input(gt, rows, ids)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_gt = coco_cls(gt)
        coco_dt = coco_gt.loadRes(rows)
        ev = eval_cls(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats[:12])}
    return CocoResult(stats, _per_class(ev, gt), buf.getvalue(), len(rows)), ev


def _pycocotools_eval(gt: dict, rows: Results, ids: list) -> tuple[CocoResult, Any]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def make_gt(d: dict) -> COCO:
        coco = COCO()
        coco.dataset = d
        coco.createIndex()
        return coco

    return _cocoeval(make_gt, COCOeval, gt, rows, ids)


def _pycocotools(gt: dict, rows: Results, ids: list) -> CocoResult:
    return _pycocotools_eval(gt, rows, ids)[0]


def with_interval(gt: dict, rows: Results, ids: list, resamples: int, seed: int = boot.SEED) -> CocoResult:
    """One pycocotools evaluation, plus the bootstrap percentile interval (``boot.LEVEL``) of each of the 12
    numbers from ``resamples`` image resamples of its per-image matching (no second ``evaluate()``)."""
    result, ev = _pycocotools_eval(gt, rows, ids)
    t0 = time.perf_counter()
    table = boot.match_table(ev.evalImgs, ev.params)
    lo, hi = boot.percentile_interval(boot.bootstrap_stats(table, resamples, seed))
    log.info("bootstrap: %d resamples of %d images in %.1f s", resamples, table.n_images, time.perf_counter() - t0)
    result.intervals = {k: (float(a), float(b)) for k, a, b in zip(STAT_NAMES, lo, hi)}
    result.resamples = resamples
    return result


def _faster(gt: dict, rows: Results, ids: list) -> CocoResult:
    from faster_coco_eval import COCO, COCOeval_faster

    def make_eval(coco_gt, coco_dt, iou_type):
        return COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=print)

    return _cocoeval(lambda d: COCO(d), make_eval, gt, rows, ids)[0]


EVALUATORS: dict[str, Callable[[dict, Results, list], CocoResult]] = {
    "pycocotools": _pycocotools,
    "faster": _faster,
}


def _per_class(ev: Any, gt: dict) -> pd.DataFrame:
    """AP50-95 and AP50 per category (area all, maxDets 100) from ``ev.eval['precision']``.

    precision has shape [T iou thresholds, R recall points, K categories, A areas, M maxDets];
    -1 marks categories without ground truth.
    """
    precision = np.asarray(ev.eval["precision"])
    cat_ids = list(ev.params.catIds)
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt.get("categories", [])}
    counts: dict[Any, int] = {}
    for a in gt.get("annotations", []):
        if not a.get("iscrowd", 0):
            counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    out = []
    for k, cid in enumerate(cat_ids):
        p = precision[:, :, k, 0, -1]
        p50 = precision[0, :, k, 0, -1]
        out.append({
            "category_id": cid,
            "name": names.get(cid, str(cid)),
            "instances": counts.get(cid, 0),
            "AP50-95": float(p[p > -1].mean()) if (p > -1).any() else float("nan"),
            "AP50": float(p50[p50 > -1].mean()) if (p50 > -1).any() else float("nan"),
        })
    return pd.DataFrame(out, columns=["category_id", "name", "instances", "AP50-95", "AP50"])


def _empty_per_class(gt: dict) -> pd.DataFrame:
    counts: dict[Any, int] = {}
    for a in gt.get("annotations", []):
        counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    rows = [{"category_id": c["id"], "name": c.get("name", str(c["id"])), "instances": counts.get(c["id"], 0),
             "AP50-95": 0.0 if counts.get(c["id"]) else float("nan"),
             "AP50": 0.0 if counts.get(c["id"]) else float("nan")} for c in gt.get("categories", [])]
    return pd.DataFrame(rows, columns=["category_id", "name", "instances", "AP50-95", "AP50"])
