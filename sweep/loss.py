"""YOLOv5's training loss (``ComputeLoss`` of utils/loss.py, v6/v7), written from its definition.

``YoloLoss(model, hyp=None)(preds, targets) -> (loss [1], components [3])``

* ``preds``: the detection model's train-mode output, one raw map ``[B, A, H_l, W_l, 5 + nc]``
  (logits) per level.
* ``targets``: ``[N, 6]`` rows ``(image index, class, cx, cy, w, h)``, the box normalised to the
  network input (0..1).
* ``loss``: ``(box + obj + cls) * B`` (shape ``[1]``, differentiable); ``components``: the
  detached ``[box, obj, cls]`` (each already multiplied by its gain).

Definition (all of it YOLOv5's; the code is ours):

Target assignment, per level with grid ``H x W`` and anchors ``a`` (in units of the level's
stride): a target (box in grid units ``gx, gy, gw, gh``) is matched to every anchor whose
width and height ratios ``r = (gw / a_w, gh / a_h)`` satisfy ``max(r, 1 / r) < anchor_t``
(both sides). Each match is predicted by the cell containing the centre and also by the two
neighbouring cells nearest to the centre: the left cell when the fractional part of ``gx`` is
below 0.5 (and ``gx > 1``), the right one when that of ``W - gx`` is below 0.5 (and ``W - gx >
1``), the same vertically. Cell indices are clamped to the grid. The regression target is the
centre relative to the predicting cell's corner (so in -0.5..1.5) and ``(gw, gh)``.

Box: the prediction at a matched cell is ``xy = 2 sigmoid(t_xy) - 0.5``, ``wh = (2
sigmoid(t_wh))^2 a``; box loss = mean over matches of ``1 - CIoU`` (torchvision's
``complete_box_iou_loss``, which computes exactly CIoU's definition, alpha without gradient).
Objectness: BCE-with-logits (positive weight ``obj_pw``) against a target map that is 0
everywhere and ``CIoU.detach().clamp(0)`` at matched cells (a cell matched twice keeps the last
match, in the order level -> centre, left, top, right, bottom -> anchor -> target), averaged over
all ``B*A*H*W`` cells of the level and weighted 4.0, 1.0, 0.4 for three levels (4.0, 1.0, 0.25,
0.06, 0.02 otherwise). Classes (only when nc > 1): BCE-with-logits (``cls_pw``) of the matched
cells' class logits against ``1 - eps/2`` for the true class and ``eps/2`` elsewhere (label
smoothing ``eps``), averaged. ``fl_gamma > 0`` wraps both BCEs in the focal loss (alpha 0.25):
each element's BCE times ``alpha_t (1 - p_t)^gamma`` before averaging. Then ``box *= hyp.box``,
``obj *= hyp.obj``, ``cls *= hyp.cls``.

The gains are used as given: train.py rescales them to the number of levels, classes and image
size before building the loss (see :func:`scaled_loss_hyp`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, complete_box_iou_loss

from sweep.config.hyp import resolve_hyp

__all__ = ["YoloLoss", "scaled_loss_hyp", "objectness_balance", "detect_head"]

#: Neighbour-cell shifts (dx, dy): centre, left, top, right, bottom.
_CELL_SHIFTS = ((0, 0), (-1, 0), (0, -1), (1, 0), (0, 1))
FOCAL_ALPHA = 0.25


def detect_head(model: nn.Module) -> nn.Module:
    """The model's detection head: ``model.model[-1]`` when it has anchors, else the last module that does."""
    seq = getattr(model, "model", None)
    if isinstance(seq, nn.Sequential) and hasattr(seq[-1], "anchors"):
        return seq[-1]
    heads = [m for m in model.modules() if hasattr(m, "anchors") and hasattr(m, "nl") and hasattr(m, "na")]
    if not heads:
        raise ValueError("the model has no detection head (a module with anchors, nl, na)")
    return heads[-1]


def objectness_balance(nl: int) -> list[float]:
    """Per-level objectness weights: [4.0, 1.0, 0.4] for 3 levels, else the first nl of [4.0, 1.0, 0.25, 0.06, 0.02]."""
    if nl == 3:
        return [4.0, 1.0, 0.4]
    table = [4.0, 1.0, 0.25, 0.06, 0.02]
    if nl > len(table):
        raise ValueError(f"{nl} detection levels: YOLOv5's objectness balance is defined for at most {len(table)}")
    return table[:nl]


def scaled_loss_hyp(hyp: Mapping[str, Any], nl: int, nc: int, imgsz: int) -> dict[str, float]:
    """The gains as train.py scales them: box * 3/nl, cls * nc/80 * 3/nl, obj * (imgsz/640)^2 * 3/nl."""
    out = dict(hyp)
    out["box"] = float(hyp["box"]) * (3 / nl)  # the factor first, as train.py's `*=` evaluates it
    out["cls"] = float(hyp["cls"]) * (nc / 80 * 3 / nl)
    out["obj"] = float(hyp["obj"]) * ((imgsz / 640) ** 2 * 3 / nl)
    return out


def _bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean BCE-with-logits (positive weight), focal-modulated when ``gamma > 0``."""
    if gamma <= 0:
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    p = logits.sigmoid()
    p_t = target * p + (1 - target) * (1 - p)
    alpha_t = target * FOCAL_ALPHA + (1 - target) * (1 - FOCAL_ALPHA)
    return (loss * alpha_t * (1.0 - p_t) ** gamma).mean()


class YoloLoss:
    """YOLOv5's ``ComputeLoss`` for a detection model (see the module doc for the definition).

    ``model``: our ``DetectionModel`` (or anything whose detection head has ``anchors`` [L, A, 2]
    in stride units, ``nl``, ``na``, ``nc``). ``hyp``: overrides of the loss keys of
    :data:`sweep.config.hyp.HYP_SCRATCH_LOW` (``box``, ``obj``, ``cls``, ``cls_pw``, ``obj_pw``,
    ``anchor_t``, ``fl_gamma``, ``label_smoothing``); other known keys are accepted and ignored.
    The anchors are read from the head at every call, so the loss follows the model's device.
    """

    def __init__(self, model: nn.Module, hyp: Mapping[str, Any] | None = None):
        self.head = detect_head(model)
        self.hyp = resolve_hyp(hyp)
        self.nl, self.na, self.nc = int(self.head.nl), int(self.head.na), int(self.head.nc)
        self.balance = objectness_balance(self.nl)
        eps = self.hyp["label_smoothing"]
        self.cls_pos, self.cls_neg = 1.0 - 0.5 * eps, 0.5 * eps

    # ------------------------------------------------------------------ assignment
    def build_targets(self, preds: Sequence[torch.Tensor], targets: torch.Tensor
                      ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor, torch.Tensor]]:
        """Per level: ``(b, a, gj, gi, tbox [n, 4], anchor_wh [n, 2], cls)`` of every match.

        ``tbox`` is (x, y) of the centre relative to cell ``(gi, gj)`` and (w, h), in grid units.
        """
        device = targets.device
        nt = targets.shape[0]
        anchor_idx = torch.arange(self.na, device=device, dtype=targets.dtype).view(self.na, 1, 1).expand(self.na, nt, 1)
        # [A, N, 7]: each target once per anchor, its anchor index appended
        per_anchor = torch.cat((targets.unsqueeze(0).expand(self.na, nt, 6), anchor_idx), 2)
        shifts = torch.tensor(_CELL_SHIFTS, device=device, dtype=torch.long)  # [5, 2]
        anchors_all = self.head.anchors.to(device=device, dtype=targets.dtype)
        out = []
        for i, p in enumerate(preds):
            ny, nx = int(p.shape[2]), int(p.shape[3])
            anchors = anchors_all[i]  # [A, 2] grid units
            to_grid = torch.tensor([1, 1, nx, ny, nx, ny, 1], device=device, dtype=targets.dtype)
            t = per_anchor * to_grid
            ratio = t[..., 4:6] / anchors[:, None]                        # [A, N, 2]
            matched = torch.max(ratio, 1 / ratio).amax(2) < self.hyp["anchor_t"]
            t = t[matched]                                                # [m, 7], anchor-major
            gxy = t[:, 2:4]
            gxy_inv = torch.tensor([nx, ny], device=device, dtype=targets.dtype) - gxy
            low = ((gxy % 1 < 0.5) & (gxy > 1)).T                         # [2, m]: left, top
            high = ((gxy_inv % 1 < 0.5) & (gxy_inv > 1)).T                # [2, m]: right, bottom
            use = torch.stack((torch.ones_like(low[0]), low[0], low[1], high[0], high[1]))  # [5, m]
            t = t.unsqueeze(0).expand(5, *t.shape)[use]                   # [n, 7], shift-major
            shift = shifts[:, None, :].expand(5, use.shape[1], 2)[use]    # [n, 2]
            gxy, gwh = t[:, 2:4], t[:, 4:6]
            cell = gxy.long() + shift
            cell[:, 0].clamp_(0, nx - 1)
            cell[:, 1].clamp_(0, ny - 1)
            a = t[:, 6].long()
            out.append((t[:, 0].long(), a, cell[:, 1], cell[:, 0], torch.cat((gxy - cell, gwh), 1), anchors[a],
                        t[:, 1].long()))
        return out

    # ------------------------------------------------------------------ loss
    def __call__(self, preds: Sequence[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(preds) != self.nl:
            raise ValueError(f"expected {self.nl} prediction maps (train-mode output), got {len(preds)}")
        device = preds[0].device
        targets = targets.to(device=device, dtype=torch.float32)
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError(f"targets must be [N, 6] (image, class, cx, cy, w, h), got {tuple(targets.shape)}")
        gamma = self.hyp["fl_gamma"]
        cls_pw = torch.tensor([self.hyp["cls_pw"]], device=device)
        obj_pw = torch.tensor([self.hyp["obj_pw"]], device=device)
        lbox = torch.zeros(1, device=device)
        lobj = torch.zeros(1, device=device)
        lcls = torch.zeros(1, device=device)
        for i, (p, (b, a, gj, gi, tbox, anchor_wh, tcls)) in enumerate(zip(preds, self.build_targets(preds, targets))):
            tobj = torch.zeros(p.shape[:4], dtype=p.dtype, device=device)
            n = b.shape[0]
            if n:
                ps = p[b, a, gj, gi]                                       # [n, 5 + nc]
                pxy = ps[:, 0:2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anchor_wh
                pbox = box_convert(torch.cat((pxy, pwh), 1), "cxcywh", "xyxy")
                box_loss = complete_box_iou_loss(pbox, box_convert(tbox, "cxcywh", "xyxy"), reduction="none")  # 1 - CIoU
                lbox = lbox + box_loss.mean()
                tobj[b, a, gj, gi] = (1.0 - box_loss.detach()).clamp(0).to(tobj.dtype)
                if self.nc > 1:
                    pcls = ps[:, 5:]
                    t = torch.full_like(pcls, self.cls_neg)
                    t[torch.arange(n, device=device), tcls] = self.cls_pos
                    lcls = lcls + _bce(pcls, t, cls_pw, gamma)
            lobj = lobj + _bce(p[..., 4], tobj, obj_pw, gamma) * self.balance[i]
        lbox = lbox * self.hyp["box"]
        lobj = lobj * self.hyp["obj"]
        lcls = lcls * self.hyp["cls"]
        bs = preds[0].shape[0]
        return (lbox + lobj + lcls) * bs, torch.cat((lbox, lobj, lcls)).detach()
