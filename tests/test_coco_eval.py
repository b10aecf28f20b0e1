"""COCO evaluators: pycocotools and faster-coco-eval agree; empty results give zeros."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sweep.evaluate.coco import STAT_NAMES, CocoEvaluator
from sweep.data.dataset import Dataset, coco_ground_truth


@pytest.fixture(scope="module")
def gt_and_predictions(val128_dir):
    """Ground truth from the real coco-val128 labels; predictions = jittered GT boxes with random
    scores and classes (some wrong), plus random false positives: every matching path is exercised."""
    ds = Dataset(val128_dir / "images" / "val2017", [str(i) for i in range(80)], imgsz=640, batch=32, workers=0)
    gt = coco_ground_truth(ds)
    rng = np.random.default_rng(0)
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    rows = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 0.08, 4) * [w, h, w, h]
        cat = a["category_id"] if rng.random() > 0.1 else int(rng.integers(0, 80))
        rows.append({"image_id": a["image_id"], "category_id": cat,
                     "bbox": [round(float(v), 3) for v in (x + j[0], y + j[1], max(w + j[2], 1), max(h + j[3], 1))],
                     "score": round(float(rng.random()), 5)})
    for image_id, (W, H) in sizes.items():
        for _ in range(5):
            w, h = rng.uniform(5, W / 2), rng.uniform(5, H / 2)
            rows.append({"image_id": image_id, "category_id": int(rng.integers(0, 80)),
                         "bbox": [round(float(rng.uniform(0, W - w)), 3), round(float(rng.uniform(0, H - h)), 3),
                                  round(float(w), 3), round(float(h), 3)],
                         "score": round(float(rng.random() * 0.5), 5)})
    return gt, rows, [im["id"] for im in gt["images"]]


def _detections(rows):
    """The rows as the inference loop hands them over: per image, [n, 6] xyxy + score + class tensors."""
    per_image: dict = {}
    for r in rows:
        x, y, w, h = r["bbox"]
        per_image.setdefault(r["image_id"], []).append([x, y, x + w, y + h, r["score"], r["category_id"]])
    ids = list(per_image)
    return ids, [torch.tensor(per_image[i], dtype=torch.float32) for i in ids]


def _compute(gt, rows, ids, backend, class_map=None):
    ev = CocoEvaluator(gt, backend=backend, image_ids=ids, class_map=class_map)
    image_ids, dets = _detections(rows)
    for i in range(0, len(image_ids), 7):  # batch by batch, as the inference loop does
        ev.process(SimpleNamespace(image_ids=image_ids[i:i + 7]), dets[i:i + 7])
    return ev.evaluate()


def test_faster_backend_equals_pycocotools(gt_and_predictions):
    gt, rows, ids = gt_and_predictions
    ref = _compute(gt, rows, ids, "pycocotools")
    fast = _compute(gt, rows, ids, "faster")
    assert set(ref.stats) == set(STAT_NAMES)
    assert 0.2 < ref.stats["mAP50"] < 1.0   # a meaningful, non-trivial result
    for k in STAT_NAMES:
        assert abs(ref.stats[k] - fast.stats[k]) < 1e-6, k
    assert np.allclose(ref.per_class["AP50-95"].fillna(-1), fast.per_class["AP50-95"].fillna(-1), atol=1e-6)


def test_no_detections_gives_zeros_not_a_crash(gt_and_predictions):
    gt, _, ids = gt_and_predictions
    for backend in ("pycocotools", "faster"):
        res = CocoEvaluator(gt, backend=backend, image_ids=ids).evaluate()
        assert all(v == 0.0 for v in res.stats.values())
        assert len(res.per_class) == len(gt["categories"])


def test_the_evaluator_owns_class_ids_rounding_and_the_predictions_json():
    """Class index -> category id, val.py's rounding, and a JSON written before COCO touches the rows."""
    import json

    gt = {"images": [{"id": 7, "width": 100, "height": 100}], "categories": [{"id": 5, "name": "cat"}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 10, 20, 20], "area": 400,
                           "iscrowd": 0}]}
    ev = CocoEvaluator(gt, backend="pycocotools", image_ids=[7], class_map=[5])
    ev.process(SimpleNamespace(image_ids=[7]), [torch.tensor([[10.0, 10.0, 30.0, 30.0, 0.123456789, 0.0]])])
    rows = json.loads(ev.predictions_json())
    assert rows == [{"image_id": 7, "category_id": 5, "bbox": [10.0, 10.0, 20.0, 20.0], "score": 0.12346}]
    assert ev.evaluate().stats["mAP50"] == pytest.approx(1.0)
    ev.reset()
    assert ev.evaluate().stats["mAP50"] == 0.0  # nothing processed since the reset
