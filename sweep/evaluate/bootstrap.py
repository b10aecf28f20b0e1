"""Bootstrap confidence intervals of the COCO numbers from one COCO evaluation's per-image matching.

COCOeval's ``evaluate()`` matches every image's detections to its ground truth once
(``evalImgs``: per category, area range and image, ``dtScores``, ``dtMatches`` [T, D],
``dtIgnore`` [T, D], ``gtIgnore`` [G]). ``accumulate()`` then only sums over images. A bootstrap
resample of the images (drawn with replacement) is therefore a *weighting* of the images: image
``i`` drawn ``w_i`` times contributes ``w_i`` copies of its detections and ground truth. This module
re-does the accumulate step for many weightings at once, vectorised with numpy, without running
inference or the matching again:

- :func:`match_table` turns ``evalImgs`` into flat arrays, once;
- :func:`accumulate` gives COCOeval's ``precision`` (at the largest maxDets) and ``recall`` for a
  batch of weightings; with every weight 1 it reproduces COCOeval's arrays exactly (tested);
- :func:`summarize` gives COCOeval's 12 ``stats`` from them, computed as COCOeval computes them;
- :func:`bootstrap_interval` draws the resamples (seeded) and returns percentile intervals.

Why it is fast: the interpolated precision at a recall threshold is the largest precision at or
after the first true positive reaching that recall, so only true-positive positions need a
precision; the false positives enter as the cumulative weight of the false positives ranked before
each true positive. Per resample that is one cumulative sum over the false positives of each
(category, area) plus one per IoU threshold over its true positives (far fewer), instead of
COCOeval's T cumulative sums over every detection.

Ties: COCOeval run on an explicitly resampled set breaks ties in score by image order, then by the
image's own detection order, so the copies of an image's tied detections interleave (a1 a2 a1 a2);
a weighting keeps the copies of each detection together (a1 a1 a2 a2). Recall is the same; on
yolov5n's detections of coco-val128 a few precision entries differ by < 3e-5 and the stats by < 1e-8
(tested). Both are orders of equal scores; with every weight 1 the result is COCOeval's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from sweep.contract import INTERVAL_LEVEL

LEVEL = INTERVAL_LEVEL  # two-sided percentile interval: the 2.5th and 97.5th percentiles of the resampled statistic
SEED = 0       # resamples are drawn from numpy's default_rng(SEED): the same data give the same interval
EPS = np.spacing(1)  # COCOeval's guard in tp / (tp + fp + eps)
CHUNK_BYTES = 200e6  # the size of the largest arrays of one chunk of resamples


@dataclass(frozen=True)
class Curve:
    """One (category k, area a) at the largest maxDets, its detections in COCOeval's score order.

    ``fp0_img`` [n0]: image index of each detection that is a false positive at the first IoU
    threshold. Per IoU threshold t: ``tp_img[t]`` [P_t] image of each true positive (score order),
    ``tp_n0[t]`` [P_t] how many of the ``fp0`` detections rank at or before it, ``delta_img[t]``,
    ``delta_sign[t]`` [Q_t] the detections whose false-positive status at t differs from the first
    threshold's (+1 became one, -1 stopped being one) and ``tp_nd[t]`` [P_t] how many of them rank at
    or before each true positive.
    """

    k: int
    a: int
    fp0_img: np.ndarray
    tp_img: tuple[np.ndarray, ...]
    tp_n0: tuple[np.ndarray, ...]
    delta_img: tuple[np.ndarray, ...]
    delta_sign: tuple[np.ndarray, ...]
    tp_nd: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class MatchTable:
    """COCOeval's per-image matching, flattened for :func:`accumulate`.

    ``n_images`` I, IoU thresholds ``iou_thrs`` [T], ``rec_thrs`` [R], ``max_dets`` [M], areas A,
    categories K. ``gt_img``/``gt_count``: per (k, a), the images with non-ignored ground truth and
    how many. ``tp_at_m``: per (k, a, m), the images with true positives among their first
    ``max_dets[m]`` detections, and the count per IoU threshold [n, T]. ``curves``: the (k, a) pairs
    with any detection, at the largest maxDets.
    """

    n_images: int
    n_cats: int
    n_areas: int
    iou_thrs: np.ndarray
    rec_thrs: np.ndarray
    max_dets: tuple[int, ...]
    area_labels: tuple[str, ...]
    gt_img: dict[tuple[int, int], np.ndarray]
    gt_count: dict[tuple[int, int], np.ndarray]
    tp_at_m: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]]
    curves: tuple[Curve, ...]


def _curve(k: int, a: int, img: np.ndarray, scores: np.ndarray, tp: np.ndarray, fp: np.ndarray) -> Curve:
    """``img``, ``scores`` [D]; ``tp``, ``fp`` [T, D] booleans, in image order (COCOeval's concatenation)."""
    order = np.argsort(-scores, kind="mergesort")  # COCOeval's sort
    img, tp, fp = img[order], tp[:, order], fp[:, order]
    fp0 = fp[0]
    n0 = np.cumsum(fp0)  # fp0 detections at or before each position
    tp_img, tp_n0, d_img, d_sign, tp_nd = [], [], [], [], []
    for t in range(tp.shape[0]):
        pos = np.flatnonzero(tp[t])
        diff = fp[t].astype(np.int8) - fp0.astype(np.int8)
        dpos = np.flatnonzero(diff)
        tp_img.append(img[pos])
        tp_n0.append(n0[pos])
        d_img.append(img[dpos])
        d_sign.append(diff[dpos].astype(np.float64))
        tp_nd.append(np.searchsorted(dpos, pos, side="right"))
    return Curve(k, a, img[fp0], tuple(tp_img), tuple(tp_n0), tuple(d_img), tuple(d_sign), tuple(tp_nd))


def match_table(eval_imgs: Sequence[dict | None], params: Any) -> MatchTable:
    """Flatten pycocotools' ``COCOeval.evalImgs`` (after ``evaluate()``; ``params`` = ``COCOeval.params``).

    ``evalImgs`` is laid out [K, A, I] (category, area range, image in ``params.imgIds`` order); an
    entry is None when the image has neither ground truth nor detections of that category.
    """
    K, A, I = len(params.catIds), len(params.areaRng), len(params.imgIds)
    iou = np.asarray(params.iouThrs, dtype=float)
    T = len(iou)
    max_dets = tuple(int(m) for m in params.maxDets)
    assert len(eval_imgs) == K * A * I, "evalImgs does not match params (evaluate() must run with these params)"
    gt_img, gt_count, tp_at_m, curves = {}, {}, {}, []
    for k in range(K):
        for a in range(A):
            base = k * A * I + a * I
            g_img, g_cnt = [], []
            d_img, d_score, d_tp, d_fp, d_rank = [], [], [], [], []
            for i in range(I):
                e = eval_imgs[base + i]
                if e is None:
                    continue
                n_gt = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
                if n_gt:
                    g_img.append(i)
                    g_cnt.append(n_gt)
                scores = np.asarray(e["dtScores"], dtype=float)
                if scores.size == 0:
                    continue
                dtm = np.asarray(e["dtMatches"]).reshape(T, -1)
                dtig = np.asarray(e["dtIgnore"]).reshape(T, -1).astype(bool)
                d_img.append(np.full(scores.size, i, dtype=np.int64))
                d_score.append(scores)
                d_tp.append(np.logical_and(dtm, ~dtig))           # as COCOeval: a match id that is non-zero
                d_fp.append(np.logical_and(np.logical_not(dtm), ~dtig))
                d_rank.append(np.arange(scores.size))
            gt_img[k, a] = np.asarray(g_img, dtype=np.int64)
            gt_count[k, a] = np.asarray(g_cnt, dtype=np.float64)
            if not d_img:
                for m in range(len(max_dets)):
                    tp_at_m[k, a, m] = (np.zeros(0, np.int64), np.zeros((0, T)))
                continue
            img, tp, fp, rank = (np.concatenate(d_img), np.concatenate(d_tp, axis=1), np.concatenate(d_fp, axis=1),
                                 np.concatenate(d_rank))
            for m, md in enumerate(max_dets):  # the image's first md detections (they come sorted by score)
                keep = rank < md
                per_img = np.zeros((I, T))
                np.add.at(per_img, img[keep], tp[:, keep].T.astype(np.float64))
                hit = np.flatnonzero(per_img.any(axis=1))
                tp_at_m[k, a, m] = (hit, per_img[hit])
            keep = rank < max_dets[-1]
            curves.append(_curve(k, a, img[keep], np.concatenate(d_score)[keep], tp[:, keep], fp[:, keep]))
    return MatchTable(I, K, A, iou, np.asarray(params.recThrs, dtype=float), max_dets, tuple(params.areaRngLbl),
                      gt_img, gt_count, tp_at_m, tuple(curves))


def _interpolated(tp_cum: np.ndarray, fp_cum: np.ndarray, npig: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """COCOeval's interpolated precision at ``rec_thrs`` [R] from the true-positive positions only.

    ``tp_cum``, ``fp_cum`` [B, P]: cumulative true/false-positive weight at each true positive;
    ``npig`` [B] (> 0). Returns [B, R]. The precision envelope's value at the first position reaching
    a recall threshold is the largest precision at or after it, which is always at a true positive.
    """
    B, P = tp_cum.shape
    R = rec_thrs.size
    if P == 0:
        return np.zeros((B, R))
    rc = tp_cum / npig[:, None]
    pr = tp_cum / (fp_cum + tp_cum + EPS)
    env = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
    # first position with rc >= thr_r, exactly as searchsorted(rc, thr, 'left'), for every row at once:
    # c = how many thresholds each position reaches; the position for thr_r is the count of positions with c <= r
    c = np.searchsorted(rec_thrs, rc.ravel(), side="right").reshape(B, P)
    counts = np.bincount((c + (R + 1) * np.arange(B)[:, None]).ravel(), minlength=B * (R + 1)).reshape(B, R + 1)
    first = np.cumsum(counts, axis=1)[:, :R]
    env = np.concatenate([env, np.zeros((B, 1))], axis=1)  # past the last true positive: precision 0
    return np.take_along_axis(env, first, axis=1)


def accumulate(table: MatchTable, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's accumulate for a batch of image weightings.

    ``weights`` [B, I] (how many times each image is drawn; all ones = the evaluated set). Returns
    ``precision`` [B, T, R, K, A] at the largest maxDets and ``recall`` [B, T, K, A, M], -1 where
    the (category, area) has no non-ignored ground truth, as COCOeval.
    """
    W = np.asarray(weights, dtype=np.float64)
    B = W.shape[0]
    T, R, K, A, M = table.iou_thrs.size, table.rec_thrs.size, table.n_cats, table.n_areas, len(table.max_dets)
    # filled per (category, area) block, so laid out [K, A, ...] (contiguous writes) and moved to COCOeval's order
    precision = -np.ones((K, A, B, T, R))
    recall = -np.ones((K, A, B, T, M))
    npig = {}
    for (k, a), imgs in table.gt_img.items():
        n = W[:, imgs] @ table.gt_count[k, a]
        npig[k, a] = n
        valid = n > 0
        if not valid.any():
            continue
        for m in range(M):
            hit, counts = table.tp_at_m[k, a, m]
            tp_total = W[:, hit] @ counts  # [B, T]
            recall[k, a, valid, :, m] = tp_total[valid] / n[valid, None]
        precision[k, a][valid] = 0.0  # no detection at all: precision 0 at every recall
    for cv in table.curves:
        n = npig[cv.k, cv.a]
        valid = n > 0
        if not valid.any():
            continue
        Wv, nv = W[valid], n[valid]
        fp0 = np.zeros((Wv.shape[0], cv.fp0_img.size + 1))
        np.cumsum(Wv[:, cv.fp0_img], axis=1, out=fp0[:, 1:])
        out = np.empty((Wv.shape[0], T, R))
        for t in range(T):
            tp_cum = np.cumsum(Wv[:, cv.tp_img[t]], axis=1)
            delta = np.zeros((Wv.shape[0], cv.delta_img[t].size + 1))
            if cv.delta_img[t].size:
                np.cumsum(Wv[:, cv.delta_img[t]] * cv.delta_sign[t], axis=1, out=delta[:, 1:])
            fp_cum = fp0[:, cv.tp_n0[t]] + delta[:, cv.tp_nd[t]]
            out[:, t] = _interpolated(tp_cum, fp_cum, nv, table.rec_thrs)
        precision[cv.k, cv.a][valid] = out
    return np.moveaxis(precision, (0, 1), (3, 4)), np.moveaxis(recall, (0, 1), (2, 3))


def _mean_defined(s: np.ndarray) -> float:
    """COCOeval.summarize's mean over the defined entries (-1: undefined), -1 when there are none."""
    d = s[s > -1]
    return -1.0 if d.size == 0 else float(np.mean(d))


def summarize(table: MatchTable, precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """COCOeval's 12 ``stats`` (its ``summarize()`` order) of each weighting: [B, 12].

    ``precision`` [B, T, R, K, A] (largest maxDets), ``recall`` [B, T, K, A, M] from :func:`accumulate`;
    each mean is taken over the same entries in the same order as COCOeval's, so the all-ones weighting
    gives COCOeval's numbers bit for bit.
    """
    iou, labels, md = table.iou_thrs, table.area_labels, table.max_dets
    area = {lbl: i for i, lbl in enumerate(labels)}
    t50, t75 = np.where(0.5 == iou)[0], np.where(0.75 == iou)[0]
    top = len(md) - 1
    out = np.empty((precision.shape[0], 12))
    for b in range(precision.shape[0]):
        p, r = precision[b], recall[b]
        out[b] = [
            _mean_defined(p[:, :, :, area["all"]]),
            _mean_defined(p[t50][:, :, :, area["all"]]),
            _mean_defined(p[t75][:, :, :, area["all"]]),
            _mean_defined(p[:, :, :, area["small"]]),
            _mean_defined(p[:, :, :, area["medium"]]),
            _mean_defined(p[:, :, :, area["large"]]),
            _mean_defined(r[:, :, area["all"], 0]),
            _mean_defined(r[:, :, area["all"], min(1, top)]),
            _mean_defined(r[:, :, area["all"], top]),
            _mean_defined(r[:, :, area["small"], top]),
            _mean_defined(r[:, :, area["medium"], top]),
            _mean_defined(r[:, :, area["large"], top]),
        ]
    return out


def resample_weights(rng: np.random.Generator, n_resamples: int, n_images: int) -> np.ndarray:
    """[n_resamples, n_images]: how many times each image is drawn in n_images draws with replacement."""
    draws = rng.integers(0, n_images, size=(n_resamples, n_images))
    rows = np.arange(n_resamples)[:, None] * n_images
    return np.bincount((draws + rows).ravel(), minlength=n_resamples * n_images).reshape(n_resamples, n_images)


def bootstrap_stats(table: MatchTable, n_resamples: int, seed: int = SEED, chunk: int | None = None) -> np.ndarray:
    """The 12 COCO stats of ``n_resamples`` image resamples: [N, 12] (-1 where a stat is undefined).

    Resamples are drawn in chunks (``chunk`` resamples at a time; by default as many as keep the chunk's
    precision array and its largest per-curve array near 200 MB each: large chunks amortise the per-curve
    numpy calls); the draws do not depend on the chunk size.
    """
    rng = np.random.default_rng(seed)
    if chunk is None:
        per = table.iou_thrs.size * table.rec_thrs.size * table.n_cats * table.n_areas * 8
        widest = max((cv.fp0_img.size for cv in table.curves), default=1) * 8
        chunk = int(max(1, min(n_resamples, CHUNK_BYTES // max(per, widest, 1))))
    out = []
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        w = resample_weights(rng, b, table.n_images)
        out.append(summarize(table, *accumulate(table, w)))
    return np.concatenate(out) if out else np.zeros((0, 12))


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``samples`` [N, S] the two-sided percentile interval; entries of -1 (undefined in that
    resample) are left out, and a column never defined gives -1, -1 (COCOeval's "undefined")."""
    s = np.where(samples > -1, samples, np.nan)
    q = 100 * (1 - level) / 2
    lo, hi = np.full(s.shape[1], -1.0), np.full(s.shape[1], -1.0)
    ok = ~np.isnan(s).all(axis=0)
    if ok.any():
        lo[ok], hi[ok] = np.nanpercentile(s[:, ok], [q, 100 - q], axis=0)
    return lo, hi
