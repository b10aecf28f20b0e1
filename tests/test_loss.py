"""YoloLoss (sweep.loss): YOLOv5's ComputeLoss on hand-checkable cases and on the real yolov5n.

The small cases use a stand-in detection head (one level, a 4x4 grid, anchors in grid units) and
prediction maps whose logits are set by hand, so every expected number below is computed here
from the definition with plain ``math`` (never by the code under test). The real case is pinned to
what YOLOv5's own ComputeLoss gives (../shared/REFERENCE-FIGURES.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from sweep.loss import YoloLoss, objectness_balance, scaled_loss_hyp

G = 4  # grid side of the stand-in level


class Head(nn.Module):
    """The attributes YoloLoss reads from a Detect head."""

    def __init__(self, anchors, nc: int = 3):
        super().__init__()
        a = torch.tensor(anchors, dtype=torch.float32)
        self.register_buffer("anchors", a.view(1, -1, 2))
        self.nl, self.na, self.nc = 1, a.view(-1, 2).shape[0], nc


def preds(na: int = 1, nc: int = 3, obj: float = -2.0, cls: tuple[float, ...] | None = None, b: int = 1):
    """One level [b, na, G, G, 5 + nc]: box logits 0 (pred box = centre 0.5, wh = anchor), given obj/cls logits."""
    p = torch.zeros(b, na, G, G, 5 + nc)
    p[..., 4] = obj
    if cls is not None:
        p[..., 5:] = torch.tensor(cls)
    return [p.requires_grad_()]


def target(gx: float, gy: float, gw: float, gh: float, cls: int = 0, img: int = 0) -> list[float]:
    return [img, cls, gx / G, gy / G, gw / G, gh / G]


def ciou(b1, b2) -> float:
    """CIoU of two (cx, cy, w, h) boxes, straight from its definition."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = b1, b2
    ix = max(0.0, min(x1 + w1 / 2, x2 + w2 / 2) - max(x1 - w1 / 2, x2 - w2 / 2))
    iy = max(0.0, min(y1 + h1 / 2, y2 + h2 / 2) - max(y1 - h1 / 2, y2 - h2 / 2))
    inter = ix * iy
    iou = inter / (w1 * h1 + w2 * h2 - inter)
    cw = max(x1 + w1 / 2, x2 + w2 / 2) - min(x1 - w1 / 2, x2 - w2 / 2)
    ch = max(y1 + h1 / 2, y2 + h2 / 2) - min(y1 - h1 / 2, y2 - h2 / 2)
    rho2 = (x1 - x2) ** 2 + (y1 - y2) ** 2
    v = 4 / math.pi ** 2 * (math.atan(w2 / h2) - math.atan(w1 / h1)) ** 2
    alpha = v / (v - iou + 1) if v else 0.0
    return iou - rho2 / (cw ** 2 + ch ** 2) - alpha * v


def bce(x: float, y: float) -> float:
    return math.log1p(math.exp(x)) - x * y


def focal(x: float, y: float, gamma: float, alpha: float = 0.25) -> float:
    p = 1 / (1 + math.exp(-x))
    p_t = y * p + (1 - y) * (1 - p)
    a_t = y * alpha + (1 - y) * (1 - alpha)
    return bce(x, y) * a_t * (1 - p_t) ** gamma


def cells(assign) -> list[tuple[int, int, int]]:
    b, a, gj, gi, *_ = assign
    return list(zip(a.tolist(), gi.tolist(), gj.tolist()))


# --------------------------------------------------------------------------- assignment


def test_one_target_centre_and_two_nearest_neighbour_cells():
    # centre (1.25, 2.75): x fraction 0.25 -> left neighbour; y fraction 0.75 -> the cell below
    loss = YoloLoss(Head([1.0, 1.0]))
    assign = loss.build_targets(preds(), torch.tensor([target(1.25, 2.75, 1, 1)]))[0]
    assert cells(assign) == [(0, 1, 2), (0, 0, 2), (0, 1, 3)]  # centre, left, bottom (order: centre, l, t, r, b)
    torch.testing.assert_close(assign[4], torch.tensor([[0.25, 0.75, 1, 1], [1.25, 0.75, 1, 1], [0.25, -0.25, 1, 1]]))
    torch.testing.assert_close(assign[5], torch.ones(3, 2))


def test_neighbours_only_inside_the_grid_and_not_from_the_first_cell():
    loss = YoloLoss(Head([1.0, 1.0]))
    # gx 0.25: fraction < 0.5 but gx <= 1 -> no left cell; gx' = 4 - 0.25 = 3.75 -> no right cell either.
    # gy 3.6: fraction 0.6 -> below (gy' = 0.4 <= 1: none); above: fraction of gy not < 0.5: none.
    assert cells(loss.build_targets(preds(), torch.tensor([target(0.25, 3.6, 1, 1)]))[0]) == [(0, 0, 3)]
    # gx 2.7, gy 1.2: right (gx' = 1.3, fraction 0.3) and top (gy 1.2 > 1, fraction 0.2)
    assert cells(loss.build_targets(preds(), torch.tensor([target(2.7, 1.2, 1, 1)]))[0]) == [(0, 2, 1), (0, 2, 0),
                                                                                            (0, 3, 1)]


def test_anchor_ratio_rejection_both_sides():
    loss = YoloLoss(Head([1.0, 1.0, 4.0, 4.0]))  # two anchors
    # 4.5 x 4.5: ratio 4.5 to anchor 0 (rejected, >= anchor_t 4), 1.125 to anchor 1 (kept)
    a = loss.build_targets(preds(na=2), torch.tensor([target(1.6, 1.6, 4.5, 4.5)]))[0]
    assert set(a[1].tolist()) == {1}
    # 0.9 x 0.2: anchor 0 has h ratio 1/0.2 = 5 (rejected); anchor 1 far worse
    a = loss.build_targets(preds(na=2), torch.tensor([target(1.6, 1.6, 0.9, 0.2)]))[0]
    assert a[0].numel() == 0
    # a bigger anchor_t keeps it
    a = YoloLoss(Head([1.0, 1.0, 4.0, 4.0]), {"anchor_t": 5.5}).build_targets(
        preds(na=2), torch.tensor([target(1.6, 1.6, 0.9, 0.2)]))[0]
    assert set(a[1].tolist()) == {0}


def test_image_index_and_class_are_carried():
    loss = YoloLoss(Head([1.0, 1.0]))
    b, a, gj, gi, tbox, anch, tcls = loss.build_targets(preds(b=3), torch.tensor([target(0.6, 0.6, 1, 1, 2, 2)]))[0]
    assert b.tolist() == [2, 2, 2] and tcls.tolist() == [2, 2, 2]  # centre, right, bottom


# --------------------------------------------------------------------------- loss values


def expected_one_target(obj: float, cls_logits, cp: float, cn: float, gamma: float = 0.0):
    """box, obj, cls (before gains) for target (1.25, 2.75, 1, 1), anchor 1x1, box logits 0."""
    pred = (0.5, 0.5, 1.0, 1.0)  # every cell predicts this box relative to its corner
    c = [ciou(pred, t) for t in ((0.25, 0.75, 1, 1), (1.25, 0.75, 1, 1), (0.25, -0.25, 1, 1))]
    box = sum(1 - v for v in c) / 3
    f = (lambda x, y: focal(x, y, gamma)) if gamma > 0 else bce
    tobj = [max(v, 0.0) for v in c]
    # 16 cells: three matched (targets tobj), 13 with target 0
    lobj = (13 * f(obj, 0.0) + sum(f(obj, t) for t in tobj)) / 16
    cls_rows = [[f(x, cp if k == 0 else cn) for k, x in enumerate(cls_logits)] for _ in range(3)]
    lcls = sum(map(sum, cls_rows)) / (3 * len(cls_logits))
    return box, lobj, lcls, c


def test_known_iou_objectness_and_class_loss():
    head = Head([1.0, 1.0])
    hyp = {"box": 0.05, "obj": 1.0, "cls": 0.5}
    p = preds(obj=-2.0, cls=(1.0, 0.0, -1.0), b=2)
    loss, comp = YoloLoss(head, hyp)(p, torch.tensor([target(1.25, 2.75, 1, 1)]))
    box, lobj, lcls, c = expected_one_target(-2.0, (1.0, 0.0, -1.0), 1.0, 0.0)
    # the hand numbers: IoU 0.5625 / 1.4375 at the centre cell minus the centre-distance term 0.125 / 3.125
    assert c[0] == pytest.approx(0.5625 / 1.4375 - 0.04)
    assert c[1] < 0 and c[2] < 0  # neighbour cells: negative CIoU -> objectness target clamped to 0
    # image 1 has no target: its 16 cells all have objectness target 0 (mean over 2 images)
    lobj = (lobj * 16 + 16 * bce(-2.0, 0.0)) / 32
    want = torch.tensor([box * 0.05, lobj * 4.0 * 1.0, lcls * 0.5])
    torch.testing.assert_close(comp, want.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss, want.sum().view(1).float() * 2, rtol=1e-6, atol=1e-7)  # x batch size
    loss.backward()
    assert p[0].grad is not None and p[0].grad.abs().sum() > 0


def test_label_smoothing_and_positive_weights():
    head = Head([1.0, 1.0])
    t = torch.tensor([target(1.25, 2.75, 1, 1)])
    plain = YoloLoss(head)(preds(cls=(1.0, 0.0, -1.0)), t)[1]
    smooth = YoloLoss(head, {"label_smoothing": 0.2})(preds(cls=(1.0, 0.0, -1.0)), t)[1]
    _, _, lcls, _ = expected_one_target(-2.0, (1.0, 0.0, -1.0), 0.9, 0.1)
    assert smooth[2].item() == pytest.approx(lcls * 0.5, rel=1e-6)
    assert smooth[0] == plain[0] and smooth[1] == plain[1]
    # cls_pw weighs the positive term: BCE = -(pw * y log p + (1 - y) log(1 - p))
    pw = YoloLoss(head, {"cls_pw": 2.0})(preds(cls=(1.0, 0.0, -1.0)), t)[1]

    def bce_pw(x, y, w):
        p = 1 / (1 + math.exp(-x))
        return -(w * y * math.log(p) + (1 - y) * math.log(1 - p))

    want = sum(bce_pw(x, 1.0 if k == 0 else 0.0, 2.0) for k, x in enumerate((1.0, 0.0, -1.0))) / 3 * 0.5
    assert pw[2].item() == pytest.approx(want, rel=1e-6)


def test_focal_loss_variant():
    head = Head([1.0, 1.0])
    t = torch.tensor([target(1.25, 2.75, 1, 1)])
    comp = YoloLoss(head, {"fl_gamma": 1.5})(preds(obj=-2.0, cls=(1.0, 0.0, -1.0)), t)[1]
    box, lobj, lcls, _ = expected_one_target(-2.0, (1.0, 0.0, -1.0), 1.0, 0.0, gamma=1.5)
    torch.testing.assert_close(comp, torch.tensor([box * 0.05, lobj * 4.0, lcls * 0.5]).float(), rtol=1e-6,
                               atol=1e-8)


def test_no_targets_only_objectness():
    loss, comp = YoloLoss(Head([1.0, 1.0]))(preds(obj=-2.0), torch.zeros(0, 6))
    assert comp[0] == 0 and comp[2] == 0
    assert comp[1].item() == pytest.approx(4.0 * bce(-2.0, 0.0), rel=1e-6)


def test_single_class_has_no_class_loss():
    comp = YoloLoss(Head([1.0, 1.0], nc=1))(preds(nc=1, cls=(3.0,)), torch.tensor([target(1.25, 2.75, 1, 1)]))[1]
    assert comp[2] == 0 and comp[0] > 0


def test_balance_and_train_py_gain_scaling():
    assert objectness_balance(3) == [4.0, 1.0, 0.4]
    assert objectness_balance(4) == [4.0, 1.0, 0.25, 0.06]
    with pytest.raises(ValueError):
        objectness_balance(6)
    h = scaled_loss_hyp({"box": 0.05, "obj": 1.0, "cls": 0.5}, nl=3, nc=80, imgsz=640)
    assert (h["box"], h["obj"], h["cls"]) == (0.05, 1.0, 0.5)
    h = scaled_loss_hyp({"box": 0.05, "obj": 1.0, "cls": 0.5}, nl=4, nc=20, imgsz=320)
    assert h["box"] == pytest.approx(0.0375) and h["cls"] == pytest.approx(0.5 * 0.25 * 0.75)
    assert h["obj"] == pytest.approx(0.25 * 0.75)


def test_unknown_hyp_key_is_refused():
    with pytest.raises(ValueError, match="lr00"):
        YoloLoss(Head([1.0, 1.0]), {"lr00": 0.1})


# --------------------------------------------------------------------------- the real yolov5n


def reference_batch(val128_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """REFERENCE-FIGURES' batch: first 8 images, plain 640x640 INTER_LINEAR resize, every label line."""
    files = sorted((val128_dir / "images" / "val2017").glob("*.jpg"))[:8]
    ims, rows = [], []
    for i, f in enumerate(files):
        im = cv2.resize(cv2.imread(str(f)), (640, 640), interpolation=cv2.INTER_LINEAR)
        ims.append(np.ascontiguousarray(im[:, :, ::-1].transpose(2, 0, 1)))
        lb = np.loadtxt(val128_dir / "labels" / "val2017" / f"{f.stem}.txt", ndmin=2, dtype=np.float32)
        rows.append(np.concatenate([np.full((len(lb), 1), i, np.float32), lb], 1))
    return torch.from_numpy(np.stack(ims)).float() / 255, torch.from_numpy(np.concatenate(rows))


def test_real_yolov5n_matches_yolov5_compute_loss(v5n, val128_dir):
    import copy

    model = copy.deepcopy(v5n).float().train()
    x, t = reference_batch(val128_dir)
    assert x.shape == (8, 3, 640, 640) and t.shape[1] == 6
    preds = model(x)
    assert [tuple(p.shape) for p in preds] == [(8, 3, 80, 80, 85), (8, 3, 40, 40, 85), (8, 3, 20, 20, 85)]
    loss, comp = YoloLoss(model)(preds, t)
    # YOLOv5 ComputeLoss on this batch (REFERENCE-FIGURES.md): 1.115801 | 0.067156 0.044415 0.027905
    assert loss.shape == (1,) and not comp.requires_grad
    assert loss.item() == pytest.approx(1.115801, abs=2e-6)
    assert comp.tolist() == pytest.approx([0.067156, 0.044415, 0.027905], abs=2e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
