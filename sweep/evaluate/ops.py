"""Pure tensor functions of the evaluation, reproducing YOLOv5 ``val.py`` (v7.0) arithmetic.

Box formats: ``xyxy`` = ``(x1, y1, x2, y2)`` corners; ``cxcywh`` = centre + size (what the
model predicts); COCO ``bbox`` = ``(x, y, w, h)`` with ``(x, y)`` the top-left corner.
Every function computes in the dtype/device of its input, with the same sequence of tensor
operations as val.py, so FP16 and FP32 runs round exactly as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
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
    cand, _ = _candidates(x[None], conf_thres, multi_label and x.shape[1] - 5 > 1)  # a copy: x is left alone
    if not cand.shape[0]:
        return torch.zeros((0, 6), device=x.device)
    return _nms_candidates(cand, iou_thres, max_det, max_nms, max_wh, agnostic)


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


@dataclass(frozen=True)
class Detections:
    """The detections of one batch as columns, on the host, in val.py's order (image by image, each
    image's rows sorted by score as NMS returns them).

    ``image_index`` int64 [n]: the image's position in the batch; ``boxes`` float32 [n, 4] xyxy in
    original-image pixels; ``scores`` float32 [n]; ``classes`` int64 [n] (class index);
    ``counts`` int64 [B]: rows per image (``image_index`` is ``repeat(arange(B), counts)``).
    """

    image_index: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def from_rows(cls, rows: torch.Tensor, counts: Sequence[int]) -> Detections:
        """``rows`` [n, 6] (x1, y1, x2, y2, score, class) of all images concatenated, ``counts`` [B]."""
        rows = rows.detach().to("cpu", torch.float32).numpy().reshape(-1, 6)
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        if int(counts.sum()) != rows.shape[0]:
            raise ValueError(f"counts sum to {int(counts.sum())}, rows has {rows.shape[0]}")
        return cls(np.repeat(np.arange(counts.size, dtype=np.int64), counts), rows[:, :4].copy(),
                   rows[:, 4].copy(), rows[:, 5].astype(np.int64), counts)

    @classmethod
    def from_tensors(cls, per_image: Sequence[torch.Tensor]) -> Detections:
        """One ``[n_i, 6]`` tensor per image (the per-image path's output) as columns."""
        rows = [d.detach().to("cpu", torch.float32).reshape(-1, 6) for d in per_image]
        return cls.from_rows(torch.cat(rows) if rows else torch.zeros((0, 6)), [len(d) for d in rows])


def _candidates(pred: torch.Tensor, conf_thres: float, multi_label: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """val.py's candidate selection (the steps of NMS before its sort) for every image of ``pred``
    [B, N, 5 + nc] at once: objectness ``> conf_thres``, class scores ``*=`` objectness, cxcywh -> xyxy,
    multi-label (row, class) pairs or the best class per row.

    Returns ``cand`` [m, 6] (x1, y1, x2, y2, score, class; input pixels; float32: the float32 class column
    promotes FP16, as in val.py's concatenation) and ``image`` int64 [m], grouped by image in image order,
    each image's rows in val.py's order. Every operation is elementwise or row-wise, so the rows of one image
    are the same whether it runs alone (:func:`nms_image`) or in a batch (:func:`postprocess_batch`).
    """
    keep = pred[..., 4] > conf_thres                 # [B, N], strictly greater as val.py
    image = keep.nonzero()[:, 0]                     # row-major: grouped by image, rows in order
    x = pred[keep]                                   # [M, 5 + nc], a copy
    x[:, 5:] *= x[:, 4:5]
    box = torchvision.ops.box_convert(x[:, :4], "cxcywh", "xyxy")
    if multi_label:
        i, j = (x[:, 5:] > conf_thres).nonzero(as_tuple=False).T
        return torch.cat((box[i], x[i, j + 5, None], j[:, None].float()), 1), image[i]
    score, j = x[:, 5:].max(1, keepdim=True)
    ok = score.view(-1) > conf_thres
    return torch.cat((box, score, j.float()), 1)[ok], image[ok]


def _nms_candidates(x: torch.Tensor, iou_thres: float, max_det: int, max_nms: int, max_wh: int,
                    agnostic: bool) -> torch.Tensor:
    """The rest of val.py's NMS on one image's candidates ``x`` [m, 6] (m > 0): the sort
    (``argsort(descending=True)``), ``max_nms`` cut, class offsets, ``torchvision.ops.nms``, ``max_det`` cut."""
    x = x[x[:, 4].argsort(descending=True)[:max_nms]]
    c = x[:, 5:6] * (0 if agnostic else max_wh)
    keep = torchvision.ops.nms(x[:, :4] + c, x[:, 4], iou_thres)
    return x[keep[:max_det]]


def scale_boxes_rows(boxes: torch.Tensor, gain: torch.Tensor, pad: torch.Tensor, shape0: torch.Tensor) -> torch.Tensor:
    """:func:`scale_boxes` of many images' rows at once: ``boxes`` float32 [n, 4] xyxy letterboxed ->
    original xyxy, a new tensor; per row ``gain`` float32 [n] (the image's first gain), ``pad`` float32
    [n, 2] (padw, padh), ``shape0`` float32 [n, 2] (h0, w0), all on ``boxes``' device.

    The same float32 arithmetic as :func:`scale_boxes`' scalar operations: subtract the pad, divide by the
    gain, clip. Division by a Python scalar is a true float32 division on the CPU, but CUDA computes it as
    ``x * (1 / gain)`` with the reciprocal taken in float32 on the host (ATen's CPU-scalar shortcut), so on
    CUDA the rows are multiplied by the float32 reciprocal to give the same bits.
    """
    xy = boxes.view(-1, 2, 2) - pad[:, None, :]      # (x1, y1), (x2, y2) minus (padw, padh)
    if boxes.device.type == "cuda":
        inv = torch.reciprocal(gain.cpu()).to(boxes.device)  # 1.0f / gain_f32 as ATen computes it on the host
        xy = xy * inv[:, None, None]
    else:
        xy = xy / gain[:, None, None]
    hi = shape0.flip(1)[:, None, :]                  # (w0, h0) for (x, y)
    return torch.minimum(torch.clamp(xy, min=0), hi).view(-1, 4)


def postprocess_batch(pred: torch.Tensor, conf_thres: float, iou_thres: float, max_det: int,
                      ratio_pads: Sequence[RatioPad], shapes0: Sequence[Sequence[int]], multi_label: bool = True,
                      max_nms: int = 30000, max_wh: int = 7680, agnostic: bool = False,
                      map_images: Callable[..., Iterable[torch.Tensor]] = map) -> Detections:
    """NMS and box scaling of a whole batch: :func:`nms_image` of every image, then :func:`scale_boxes`
    (in FP32) of its rows, with the same results bit for bit, as columns on the host.

    ``pred`` [B, N, 5 + nc] as :func:`non_max_suppression` takes it; ``ratio_pads``, ``shapes0`` per image
    as :func:`scale_boxes` takes them. The score filter, score products, box conversion and candidate
    selection run once for the batch; the sort, ``max_nms`` cut and ``torchvision.ops.nms`` run per image
    on exactly the tensors :func:`nms_image` sorts (an unstable sort and NMS on a merged batch could order
    ties or round offset boxes differently); ``map_images(f, chunks)`` runs them (``map``, or an executor's
    ``map`` to spread the images over threads: torchvision's CPU kernel releases the GIL). The kept rows
    are scaled together and copied to the host once.
    """
    if pred.dim() != 3 or pred.shape[2] < 6:
        raise ValueError(f"pred must be [B, N, 5 + nc], got {tuple(pred.shape)}")
    B = pred.shape[0]
    if len(ratio_pads) != B or len(shapes0) != B:
        raise ValueError(f"{B} images but {len(ratio_pads)} ratio_pads and {len(shapes0)} shapes0")
    cand, image = _candidates(pred, conf_thres, multi_label and pred.shape[2] - 5 > 1)
    per_image = torch.bincount(image, minlength=B).tolist()  # the one wait for the device before NMS
    chunks = [c for c in torch.split(cand, per_image) if c.shape[0]]
    kept = list(map_images(lambda c: _nms_candidates(c, iou_thres, max_det, max_nms, max_wh, agnostic), chunks))
    it = iter(kept)
    counts = [len(next(it)) if n else 0 for n in per_image]
    if not kept or sum(counts) == 0:
        return Detections.from_rows(torch.zeros((0, 6)), counts)
    rows = torch.cat(kept).float()                   # val.py scales in FP32 on the model's device
    idx = torch.repeat_interleave(torch.arange(B), torch.tensor(counts))
    gain = torch.tensor([rp[0][0] for rp in ratio_pads], dtype=torch.float32)[idx]
    pad = torch.tensor([rp[1] for rp in ratio_pads], dtype=torch.float32)[idx]
    hw0 = torch.tensor([tuple(s[:2]) for s in shapes0], dtype=torch.float32)[idx]
    dev = rows.device
    rows[:, :4] = scale_boxes_rows(rows[:, :4], gain.to(dev), pad.to(dev), hw0.to(dev))
    return Detections.from_rows(rows.cpu(), counts)   # the one device-to-host copy
