"""COCO evaluators: pycocotools and faster-coco-eval agree; empty results give zeros."""

from __future__ import annotations

import numpy as np
import pytest

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


def _compute(gt, rows, ids, backend):
    ev = CocoEvaluator(gt, backend=backend, image_ids=ids)
    for i in range(0, len(rows), 97):  # accumulate in pieces, as the inference loop does
        ev.update(rows[i:i + 97])
    return ev.compute()


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
        res = CocoEvaluator(gt, backend=backend, image_ids=ids).compute()
        assert all(v == 0.0 for v in res.stats.values())
        assert len(res.per_class) == len(gt["categories"])
