"""NMS, box mapping and COCO result rows (sweep.evaluate.ops) against hand-made cases and a brute-force
reference."""

from __future__ import annotations

import pytest
import torch
import torchvision

from sweep.evaluate.coco import coco_rows
from sweep.evaluate.ops import letterbox_boxes, non_max_suppression, scale_boxes


def _row(cx, cy, w, h, obj, *cls):
    return [cx, cy, w, h, obj, *cls]


def _pred(*rows):
    return torch.tensor([rows], dtype=torch.float32)


# --------------------------------------------------------------------------- NMS


def test_multi_label_one_box_two_classes_gives_two_detections():
    pred = _pred(_row(50, 50, 20, 10, 0.9, 0.8, 0.5, 0.0005))
    (det,) = non_max_suppression(pred, conf_thres=0.001, iou_thres=0.6)
    assert det.shape == (2, 6)
    # sorted by score; the box is xyxy; class 2 (0.9 * 0.0005 < 0.001) is not a candidate
    torch.testing.assert_close(det[:, :4], torch.tensor([[40., 45., 60., 55.]] * 2))
    torch.testing.assert_close(det[:, 4], torch.tensor([0.9 * 0.8, 0.9 * 0.5]))
    assert det[:, 5].tolist() == [0.0, 1.0]


def test_best_class_only_when_multi_label_off():
    pred = _pred(_row(50, 50, 20, 10, 0.9, 0.8, 0.5))
    (det,) = non_max_suppression(pred, multi_label=False)
    assert det.shape == (1, 6) and det[0, 5].item() == 0.0


def test_conf_filter_is_strictly_greater():
    t = 0.25
    pred = _pred(
        _row(10, 10, 4, 4, t, 1.0, 1.0),       # objectness == conf_thres: dropped before scoring
        _row(100, 100, 4, 4, 0.5, 0.5, 0.0),   # score 0.25 == conf_thres: dropped
        _row(200, 200, 4, 4, 0.5, 0.6, 0.0),   # score 0.3: kept
    )
    (det,) = non_max_suppression(pred, conf_thres=t)
    assert det.shape[0] == 1
    assert det[0, :2].tolist() == [198.0, 198.0]


def test_class_offset_keeps_overlapping_boxes_of_different_classes():
    a = _row(50, 50, 20, 20, 0.9, 0.9, 0.0)
    b = _row(51, 50, 20, 20, 0.8, 0.0, 0.9)   # IoU ~0.9 with a, other class
    c = _row(50, 51, 20, 20, 0.7, 0.9, 0.0)   # same class as a, suppressed by a
    (det,) = non_max_suppression(_pred(a, b, c), iou_thres=0.6)
    assert det.shape[0] == 2
    assert sorted(det[:, 5].tolist()) == [0.0, 1.0]
    (det_agn,) = non_max_suppression(_pred(a, b, c), iou_thres=0.6, agnostic=True)
    assert det_agn.shape[0] == 1


def test_max_det_and_max_nms_cut_by_score():
    rows = [_row(20 * k + 10, 10, 8, 8, 0.1 + 0.05 * k, 1.0, 0.0) for k in range(10)]
    (det,) = non_max_suppression(_pred(*rows), max_det=3)
    assert det.shape[0] == 3
    torch.testing.assert_close(det[:, 4], torch.tensor([0.55, 0.50, 0.45]))
    (det,) = non_max_suppression(_pred(*rows), max_nms=4)  # only the 4 best enter NMS
    assert det.shape[0] == 4 and det[:, 4].min().item() > 0.39


def test_single_class_path():
    pred = _pred(_row(50, 50, 20, 10, 0.9, 0.5), _row(52, 50, 20, 10, 0.8, 0.9),
                 _row(300, 300, 20, 10, 0.001, 1.0))
    (det,) = non_max_suppression(pred, multi_label=True)  # nc == 1: best-class path
    assert det.shape == (1, 6)
    torch.testing.assert_close(det[0, 4], torch.tensor(0.8 * 0.9))
    assert det[0, 5].item() == 0.0


def test_empty_and_batch_and_input_untouched():
    pred = torch.zeros((3, 5, 7))
    pred[1, 0] = torch.tensor([10, 10, 4, 4, 0.9, 0.9, 0.1])
    before = pred.clone()
    out = non_max_suppression(pred)
    assert [o.shape[0] for o in out] == [0, 2, 0]
    assert all(o.shape[1] == 6 for o in out)
    assert torch.equal(pred, before)


def _reference_nms(pred, conf, iou, max_det):
    """Brute force: per image every (row, class) with obj > conf and obj*cls > conf, then greedy
    per-class suppression in score order (scores assumed distinct)."""
    out = []
    for x in pred:
        cands = []
        for r in x.tolist():
            if r[4] <= conf:
                continue
            cx, cy, w, h = r[:4]
            for c, p in enumerate(r[5:]):
                s = torch.tensor(p, dtype=torch.float32) * torch.tensor(r[4], dtype=torch.float32)
                if s.item() > conf:
                    cands.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, s.item(), c])
        cands.sort(key=lambda d: -d[4])
        kept = []
        for d in cands:
            same = [k for k in kept if k[5] == d[5]]
            if same:
                ious = torchvision.ops.box_iou(torch.tensor([d[:4]]), torch.tensor([k[:4] for k in same]))
                if (ious > iou).any():
                    continue
            kept.append(d)
        out.append(torch.tensor(kept[:max_det]).reshape(-1, 6))
    return out


def test_matches_brute_force_reference_on_random_predictions():
    g = torch.Generator().manual_seed(0)
    b, n, nc = 2, 160, 4
    xy = torch.rand((b, n, 2), generator=g) * 200
    wh = torch.rand((b, n, 2), generator=g) * 60 + 4
    obj = torch.rand((b, n, 1), generator=g)
    cls = torch.rand((b, n, nc), generator=g)
    pred = torch.cat((xy, wh, obj, cls), 2)
    got = non_max_suppression(pred, conf_thres=0.05, iou_thres=0.5, max_det=100)
    ref = _reference_nms(pred, 0.05, 0.5, 100)
    for g_, r_ in zip(got, ref):
        assert g_.shape == r_.shape and g_.shape[0] > 30
        torch.testing.assert_close(g_, r_, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- box mapping


def test_scale_boxes_in_place_pad_gain_clip():
    rp = ((0.5, 0.5), (16.0, 42.5))
    boxes = torch.tensor([[16.0, 42.5, 116.0, 92.5, 0.9, 3.0],
                          [0.0, 0.0, 700.0, 700.0, 0.8, 1.0]])
    out = scale_boxes(boxes, rp, (300, 500))
    assert out is boxes  # in place
    torch.testing.assert_close(boxes[0, :4], torch.tensor([0.0, 0.0, 200.0, 100.0]))
    torch.testing.assert_close(boxes[1, :4], torch.tensor([0.0, 0.0, 500.0, 300.0]))  # clipped
    torch.testing.assert_close(boxes[:, 4:], torch.tensor([[0.9, 3.0], [0.8, 1.0]]))  # untouched


def test_scale_boxes_uses_first_gain_for_both_axes_like_val_py():
    rp = ((0.5, 0.25), (0.0, 0.0))
    boxes = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    scale_boxes(boxes, rp, (1000, 1000))
    assert boxes.tolist() == [[20.0, 20.0, 40.0, 40.0]]


def test_letterbox_boxes_round_trip():
    g = torch.Generator().manual_seed(1)
    h0, w0 = 427, 640
    rp = ((0.7, 0.7), (16.0, 66.5))
    xy = torch.rand((50, 2), generator=g) * torch.tensor([w0 - 60, h0 - 60])
    wh = torch.rand((50, 2), generator=g) * 50 + 1
    boxes0 = torch.cat((xy, xy + wh), 1)
    lb = letterbox_boxes(boxes0, rp)
    assert lb[:, 0].min() >= 16.0 and lb[:, 1].min() >= 66.5
    back = scale_boxes(lb.clone(), rp, (h0, w0))
    torch.testing.assert_close(back, boxes0, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------- COCO rows


def test_coco_rows_format_and_rounding():
    dets = torch.tensor([[10.12345, 20.5, 30.0, 60.25, 0.123456789, 2.0],
                         [0.0, 0.0, 1.0, 1.0, 0.5, 0.0]])
    rows = coco_rows(dets, 139, [1, 2, 3])
    assert len(rows) == 2
    r = rows[0]
    assert set(r) == {"image_id", "category_id", "bbox", "score"}
    assert r["image_id"] == 139 and r["category_id"] == 3
    assert r["score"] == round(float(torch.tensor(0.123456789)), 5) == 0.12346
    x, y, w, h = r["bbox"]
    assert (x, y) == (10.123, 20.5) and w == round(30.0 - float(torch.tensor(10.12345)), 3)
    assert h == 39.75
    assert all(v == round(v, 3) for v in r["bbox"])
    assert rows[1] == {"image_id": 139, "category_id": 1, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.5}
    assert coco_rows(torch.zeros((0, 6)), "a", [0]) == []


def test_coco_rows_top_left_is_computed_like_val_py():
    """val.py derives x from the centre (cx - w/2), in float32: reproduce that, not x1."""
    dets = torch.tensor([[0.1, 1000.3, 1234.567, 1000.9, 0.9, 0.0]])
    x, y = coco_rows(dets, 1, [0])[0]["bbox"][:2]
    b = dets[:, :4]
    cx = (b[:, 0] + b[:, 2]) / 2
    w = b[:, 2] - b[:, 0]
    assert x == round((cx - w / 2).item(), 3)
    cy = (b[:, 1] + b[:, 3]) / 2
    h = b[:, 3] - b[:, 1]
    assert y == round((cy - h / 2).item(), 3)


def test_nms_of_images_in_parallel_threads_equals_the_batch_function():
    from concurrent.futures import ThreadPoolExecutor

    from sweep.evaluate.ops import nms_image

    g = torch.Generator().manual_seed(0)
    n, nc = 3000, 80
    xy = torch.rand(6, n, 2, generator=g) * 600
    wh = torch.rand(6, n, 2, generator=g) * 120 + 2
    scores = torch.rand(6, n, 1 + nc, generator=g) ** 3  # many low scores, as a pruned model gives
    pred = torch.cat((xy, wh, scores), 2)
    serial = non_max_suppression(pred, conf_thres=0.001, iou_thres=0.65, max_det=300)
    with ThreadPoolExecutor(3) as pool:
        parallel = list(pool.map(lambda x: nms_image(x, 0.001, 0.65, 300), pred))
    assert [d.shape[0] for d in serial] == [300] * 6
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))


def test_nms_image_rejects_a_batch():
    from sweep.evaluate.ops import nms_image

    with pytest.raises(ValueError, match=r"\[N, 5 \+ nc\]"):
        nms_image(torch.zeros(2, 10, 85))
