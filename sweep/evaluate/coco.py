"""COCO bbox evaluation, an evaluator that owns its format (``reset`` / ``process`` / ``evaluate``).

The inference loop hands each batch's detections (boxes in original-image pixels) to
``process``; the evaluator maps class indices to category ids, writes the result rows exactly as
val.py's predictions JSON, and runs a COCO backend. Backends are a plain registry:
``EVALUATORS[name](ground_truth, rows, image_ids) -> CocoResult``.

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
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torchvision

from sweep.contract import COCO_METRICS
from sweep.evaluate import bootstrap as boot

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


@dataclass
class CocoEvaluator:
    """Collect detections as COCO result rows, then evaluate them against ``ground_truth``.

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
    rows: list[dict[str, Any]] = field(default_factory=list)

    def reset(self) -> None:
        self.rows = []

    def process(self, batch: Any, detections: Sequence[torch.Tensor]) -> None:
        """``detections[i]``: ``[n, 6]`` (x1, y1, x2, y2, score, class) for ``batch.image_ids[i]``."""
        for dets, image_id in zip(detections, batch.image_ids):
            classes = self.class_map if self.class_map is not None else _Identity()
            self.rows.extend(coco_rows(dets, image_id, classes))

    def predictions_json(self) -> str:
        """The rows as val.py's ``*_predictions.json`` (call before :meth:`evaluate`: COCO's loadRes adds fields)."""
        return json.dumps(self.rows)

    def evaluate(self) -> CocoResult:
        ids = list(self.image_ids) if self.image_ids is not None else [im["id"] for im in self.ground_truth["images"]]
        if not self.rows:
            log.warning("no detections at all (every score below the threshold?): every COCO number is reported as 0")
            zero = {k: (0.0, 0.0) for k in STAT_NAMES} if self.bootstrap else {}  # every resample is 0 as well
            return CocoResult({k: 0.0 for k in STAT_NAMES}, _empty_per_class(self.ground_truth), "", 0, zero,
                              self.bootstrap)
        if self.bootstrap:
            return with_interval(self.ground_truth, self.rows, ids, self.bootstrap)
        return EVALUATORS[self.backend](self.ground_truth, self.rows, ids)


class _Identity:
    def __getitem__(self, i: int) -> int:
        return i


def _cocoeval(coco_cls: Callable, eval_cls: Callable, gt: dict, rows: list[dict], ids: list) -> tuple[CocoResult, Any]:
    """The result and the COCOeval object (its ``evalImgs`` and ``params`` for a bootstrap)."""
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


def _pycocotools_eval(gt: dict, rows: list[dict], ids: list) -> tuple[CocoResult, Any]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def make_gt(d: dict) -> COCO:
        coco = COCO()
        coco.dataset = d
        coco.createIndex()
        return coco

    return _cocoeval(make_gt, COCOeval, gt, rows, ids)


def _pycocotools(gt: dict, rows: list[dict], ids: list) -> CocoResult:
    return _pycocotools_eval(gt, rows, ids)[0]


def with_interval(gt: dict, rows: list[dict], ids: list, resamples: int, seed: int = boot.SEED) -> CocoResult:
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


def _faster(gt: dict, rows: list[dict], ids: list) -> CocoResult:
    from faster_coco_eval import COCO, COCOeval_faster

    def make_eval(coco_gt, coco_dt, iou_type):
        return COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=print)

    return _cocoeval(lambda d: COCO(d), make_eval, gt, rows, ids)[0]


EVALUATORS: dict[str, Callable[[dict, list[dict], list], CocoResult]] = {
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
