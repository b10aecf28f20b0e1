"""Pure tensor functions of the evaluation, reproducing YOLOv5 ``val.py`` (v7.0) arithmetic.

Box formats: ``xyxy`` = ``(x1, y1, x2, y2)`` corners; ``cxcywh`` = centre + size (what the
model predicts); COCO ``bbox`` = ``(x, y, w, h)`` with ``(x, y)`` the top-left corner.
Every function computes in the dtype/device of its input, with the same sequence of tensor
operations as val.py, so FP16 and FP32 runs round exactly as the reference does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision

RatioPad = tuple[tuple[float, float], tuple[float, float]]


def non_max_suppression(pred: torch.Tensor, conf_thres: float = 0.001, iou_thres: float = 0.6,
                        max_det: int = 300, multi_label: bool = True, max_nms: int = 30000,
                        max_wh: int = 7680, agnostic: bool = False) -> list[torch.Tensor]:
    """val.py's NMS. ``pred``: ``[B, N, 5 + nc]`` = (cx, cy, w, h, objectness, class probs...),
    boxes in input pixels, probabilities already sigmoid-ed. ``pred`` is not modified.

    Per image: keep rows with objectness ``> conf_thres`` (strictly); class scores
    ``*= objectness``; boxes cxcywh -> xyxy; multi-label (only when ``nc > 1``): every
    (row, class) whose score ``> conf_thres`` is a candidate, in row-major order; otherwise the
    best class per row if its score ``> conf_thres``. Candidates are sorted by score
    (``argsort(descending=True)``, the call val.py makes, not a stable sort: ties keep the
    order this torch build gives, as in val.py) and cut to ``max_nms``; boxes shifted by
    ``class * max_wh`` (0 when ``agnostic``) go to ``torchvision.ops.nms(iou_thres)``; the
    first ``max_det`` kept survive.

    Returns one ``[n, 6]`` tensor per image: ``x1, y1, x2, y2, score, class`` (xyxy in input
    pixels), sorted by score. val.py stops early past a time budget (0.5 s + 0.05 s per image)
    and silently drops the remaining images' detections; we never do, so our results equal
    val.py's whenever val.py stays within its budget.
    """
    if pred.dim() != 3 or pred.shape[2] < 6:
        raise ValueError(f"pred must be [B, N, 5 + nc], got {tuple(pred.shape)}")
    return [nms_image(x, conf_thres, iou_thres, max_det, multi_label, max_nms, max_wh, agnostic) for x in pred]


def nms_image(x: torch.Tensor, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 300,
              multi_label: bool = True, max_nms: int = 30000, max_wh: int = 7680,
              agnostic: bool = False) -> torch.Tensor:
    """:func:`non_max_suppression` of ONE image: ``x`` is ``[N, 5 + nc]``, the result ``[n, 6]``.

    Images are independent, so callers may run this for the images of a batch in parallel
    threads (the torchvision kernel releases the GIL) and get the same tensors.
    """
    if x.dim() != 2 or x.shape[1] < 6:
        raise ValueError(f"x must be [N, 5 + nc], got {tuple(x.shape)}")
    multi_label = multi_label and x.shape[1] - 5 > 1
    x = x[x[:, 4] > conf_thres]  # boolean indexing copies: the in-place ops below leave the input alone
    if not x.shape[0]:
        return torch.zeros((0, 6), device=x.device)
    x[:, 5:] *= x[:, 4:5]
    box = torchvision.ops.box_convert(x[:, :4], "cxcywh", "xyxy")
    if multi_label:
        i, j = (x[:, 5:] > conf_thres).nonzero(as_tuple=False).T
        x = torch.cat((box[i], x[i, j + 5, None], j[:, None].float()), 1)
    else:
        conf, j = x[:, 5:].max(1, keepdim=True)
        x = torch.cat((box, conf, j.float()), 1)[conf.view(-1) > conf_thres]
    if not x.shape[0]:
        return torch.zeros((0, 6), device=x.device)
    x = x[x[:, 4].argsort(descending=True)[:max_nms]]
    c = x[:, 5:6] * (0 if agnostic else max_wh)
    keep = torchvision.ops.nms(x[:, :4] + c, x[:, 4], iou_thres)
    return x[keep[:max_det]]


def scale_boxes(boxes: torch.Tensor, ratio_pad: RatioPad, shape0: Sequence[int]) -> torch.Tensor:
    """Letterboxed xyxy boxes ``[n, >=4]`` -> original-image xyxy, IN PLACE (returns ``boxes``).

    ``ratio_pad = ((gain_h, gain_w), (padw, padh))`` as :class:`sweep.data.dataset.Batch` gives it,
    ``shape0 = (h0, w0)``. As val.py: subtract ``padw`` from x and ``padh`` from y, divide by
    ``gain_h`` for both axes (val.py uses the first gain only), clip x to ``[0, w0]`` and y to
    ``[0, h0]``. Only columns 0-3 are touched; pass ``dets.clone()`` to keep the input.
    """
    gain = ratio_pad[0][0]
    pad = ratio_pad[1]
    boxes[:, [0, 2]] -= pad[0]
    boxes[:, [1, 3]] -= pad[1]
    boxes[:, :4] /= gain
    h0, w0 = shape0[0], shape0[1]
    boxes[:, 0].clamp_(0, w0)
    boxes[:, 1].clamp_(0, h0)
    boxes[:, 2].clamp_(0, w0)
    boxes[:, 3].clamp_(0, h0)
    return boxes


def letterbox_boxes(boxes0: torch.Tensor, ratio_pad: RatioPad) -> torch.Tensor:
    """Inverse of :func:`scale_boxes` (without clipping): original xyxy ``[n, 4]`` ->
    letterboxed input pixels, ``x * gain_h + padw``, ``y * gain_h + padh``. Returns a new tensor.
    """
    gain = ratio_pad[0][0]
    padw, padh = ratio_pad[1]
    out = boxes0[:, :4] * gain
    out[:, [0, 2]] += padw
    out[:, [1, 3]] += padh
    return out
