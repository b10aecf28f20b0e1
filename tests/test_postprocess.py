"""The batched post-processing (ops.postprocess_batch) and the columnar COCO path (coco.CocoColumns,
evaluate_columns) against the per-image reference (nms_image + scale_boxes + coco_rows + the row dicts),
bit for bit, on yolov5n's real outputs for coco-val128 (FP32, CPU)."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from sweep.evaluate import coco as C
from sweep.evaluate.ops import Detections, nms_image, postprocess_batch, scale_boxes

CONF, IOU = 0.001, 0.65


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def _same(a: Detections, b: Detections) -> None:
    assert a.counts.tolist() == b.counts.tolist()
    for k in ("image_index", "boxes", "scores", "classes"):
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert np.array_equal(_bits(x), _bits(y)), k


def _reference(pred, batch, max_det=300, multi_label=True) -> list[torch.Tensor]:
    """The per-image path the loop took before: nms_image, then scale_boxes in FP32 on the device."""
    out = []
    for x, rp, s0 in zip(pred, batch.ratio_pad, batch.shapes0):
        d = nms_image(x, CONF, IOU, max_det, multi_label).float()
        scale_boxes(d[:, :4], rp, s0)
        out.append(d)
    return out


@pytest.fixture(scope="module")
def outputs(v5n_fused, val128_dir):
    """yolov5n's raw predictions for the first 48 images (3 rect batches of 16) + the batches + the dataset; a
    fourth batch is the first with images 1 and 3 emptied (no objectness above the threshold)."""
    from sweep.data.dataset import Dataset

    ds = Dataset(val128_dir / "images" / "val2017", names=[str(i) for i in range(80)], imgsz=640, batch=16,
                 stride=32, limit=48, workers=0)
    out = []
    with torch.inference_mode():
        for b in ds.iter_batches():
            out.append((v5n_fused(b.images.float() / 255)[0], b))
    pred, b = out[0]
    emptied = pred.clone()
    emptied[[1, 3], :, 4] = 0.0
    out.append((emptied, b))
    return ds, out


@pytest.mark.parametrize("multi_label,max_det", [(True, 300), (True, 5), (False, 300), (False, 5)])
def test_batch_equals_per_image_path_on_real_outputs(outputs, multi_label, max_det):
    _, batches = outputs
    with torch.inference_mode(), ThreadPoolExecutor(2) as pool:
        for pred, b in batches:
            ref = Detections.from_tensors(_reference(pred, b, max_det, multi_label))
            got = postprocess_batch(pred, CONF, IOU, max_det, b.ratio_pad, b.shapes0, multi_label=multi_label)
            _same(got, ref)
            threaded = postprocess_batch(pred, CONF, IOU, max_det, b.ratio_pad, b.shapes0, multi_label=multi_label,
                                         map_images=pool.map)
            _same(threaded, ref)
            if max_det == 5:
                assert got.counts.max() == 5
    assert batches[-1][1] is batches[0][1] and (got.counts[[1, 3]] == 0).all() and got.counts.sum() > 0


def test_single_class_model_and_all_empty_batch():
    """nc == 1 takes the best-class path; a batch without any candidate gives empty columns."""
    g = torch.Generator().manual_seed(0)
    pred = torch.cat((torch.rand(3, 400, 2, generator=g) * 300, torch.rand(3, 400, 2, generator=g) * 50 + 2,
                      torch.rand(3, 400, 2, generator=g) ** 4), 2)  # [B, N, 5 + 1]
    rps = [((0.5, 0.5), (0.0, 12.0)), ((1.0, 1.0), (0.0, 0.0)), ((0.75, 0.75), (8.0, 0.0))]
    shapes = [(600, 640), (320, 320), (400, 416)]
    got = postprocess_batch(pred, 0.05, 0.5, 300, rps, shapes)
    ref = [scale_boxes(nms_image(x, 0.05, 0.5, 300).float(), rp, s0) for x, rp, s0 in zip(pred, rps, shapes)]
    _same(got, Detections.from_tensors(ref))
    assert len(got) > 30 and set(got.classes.tolist()) == {0}
    none = postprocess_batch(torch.zeros(2, 10, 85), CONF, IOU, 300, rps[:2], shapes[:2])
    assert len(none) == 0 and none.counts.tolist() == [0, 0] and none.boxes.shape == (0, 4)


def test_fp16_candidates_promote_like_nms_image():
    """FP16 predictions: nms_image's float32 class column promotes the candidates; the batch path does the same."""
    g = torch.Generator().manual_seed(2)
    pred = torch.cat((torch.rand(2, 300, 2, generator=g) * 300, torch.rand(2, 300, 2, generator=g) * 60 + 2,
                      torch.rand(2, 300, 6, generator=g) ** 3), 2).half()
    rps, shapes = [((0.6, 0.6), (4.0, 0.0))] * 2, [(500, 520)] * 2
    got = postprocess_batch(pred, 0.01, 0.6, 300, rps, shapes)
    ref = [scale_boxes(nms_image(x, 0.01, 0.6, 300).float(), rp, s0) for x, rp, s0 in zip(pred, rps, shapes)]
    _same(got, Detections.from_tensors(ref))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scaling_equals_scale_boxes_on_cuda(outputs):
    """CUDA divides by a Python scalar as x * (1 / gain): the batch path must give those bits too."""
    _, batches = outputs
    for pred, b in batches:
        pred = pred.cuda()
        ref = Detections.from_tensors(_reference(pred, b))
        _same(postprocess_batch(pred, CONF, IOU, 300, b.ratio_pad, b.shapes0), ref)


# --------------------------------------------------------------------------- COCO columns


def _rows_reference(batches, class_map):
    rows = []
    for pred, b in batches:
        for d, image_id in zip(_reference(pred, b), b.image_ids):
            rows.extend(C.coco_rows(d, image_id, class_map))
    return rows


def _hex(rows):
    return [(r["image_id"], r["category_id"], [float(v).hex() for v in r["bbox"]], float(r["score"]).hex())
            for r in rows]


@pytest.fixture(scope="module")
def evaluated(outputs):
    """The reference rows and an evaluator fed the batch path's columns (the first three batches)."""
    from sweep.data.dataset import coco_ground_truth

    ds, batches = outputs
    batches = batches[:3]
    gt = coco_ground_truth(ds)
    ev = C.CocoEvaluator(gt, image_ids=list(ds.image_ids), class_map=ds.class_map)
    with torch.inference_mode():
        for pred, b in batches:
            ev.process(b, postprocess_batch(pred, CONF, IOU, 300, b.ratio_pad, b.shapes0))
    return gt, list(ds.image_ids), _rows_reference(batches, ds.class_map), ev


def test_rows_and_predictions_json_are_bit_identical(evaluated):
    _, _, ref, ev = evaluated
    assert len(ref) > 5000
    assert ev.predictions_json() == json.dumps(ref)
    assert _hex(ev.columns().rows()) == _hex(ref)
    assert C.CocoColumns.from_rows(ref).rows() == ref


def test_backends_get_the_same_annotations_from_the_array(evaluated):
    """loadRes of the Nx7 array gives the annotations loadRes of the JSON rows gives (bbox, score, area, ids)."""
    from pycocotools.coco import COCO

    gt, ids, ref, ev = evaluated
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    _, arr, _ = C._backend_input(gt, ev.columns(), ids)
    with contextlib.redirect_stdout(io.StringIO()):
        a = coco.loadRes([dict(r) for r in ref]).dataset["annotations"]
        b = coco.loadRes(arr).dataset["annotations"]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x["image_id"], x["category_id"], x["id"], x["iscrowd"]) == (y["image_id"], y["category_id"], y["id"],
                                                                           y["iscrowd"])
        assert [v.hex() for v in x["bbox"] + [x["score"], x["area"]]] == \
               [float(v).hex() for v in y["bbox"] + [y["score"], y["area"]]]


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_the_12_numbers_are_identical(evaluated, backend):
    gt, ids, ref, ev = evaluated
    want = C.EVALUATORS[backend](gt, [dict(r) for r in ref], ids)
    got = C.evaluate_columns(gt, ev.columns(), ids, backend)
    assert got.stats == want.stats and got.detections == want.detections == len(ref)
    assert got.per_class.equals(want.per_class)
    assert 0.2 < got.stats["mAP50-95"] < 0.6


def test_evaluation_is_a_picklable_function(evaluated):
    gt, ids, _, ev = evaluated
    args = pickle.loads(pickle.dumps((gt, ev.columns(), ids, "pycocotools", 0)))
    assert C.evaluate_columns(*args).stats == ev.evaluate().stats


def test_string_image_ids(evaluated):
    """File-stem ids: the columns carry them to the JSON as they are; the backends see ranks in sorted order,
    so the numbers equal those of pycocotools on the row dicts with the string ids."""
    gt, ids, ref, _ = evaluated
    name = {i: f"{i}" for i in ids}  # "1000" < "139" as strings: sorted order differs from the numbers'
    sgt = {**gt, "images": [{**im, "id": name[im["id"]]} for im in gt["images"]],
           "annotations": [{**a, "image_id": name[a["image_id"]]} for a in gt["annotations"]]}
    srows = [{**r, "image_id": name[r["image_id"]]} for r in ref]
    sids = [name[i] for i in ids]
    cols = C.CocoColumns.from_rows(srows)
    assert cols.image_id.dtype == object and cols.rows() == srows
    want = C.EVALUATORS["pycocotools"](sgt, [dict(r) for r in srows], sids)
    assert C.evaluate_columns(sgt, cols, sids, "pycocotools").stats == want.stats
    # faster-coco-eval's loadRes refuses string ids in row dicts; through the columns it evaluates them
    fast = C.evaluate_columns(sgt, cols, sids, "faster").stats
    assert all(abs(fast[k] - want.stats[k]) < 1e-12 for k in C.STAT_NAMES)
    assert C.evaluate_columns(sgt, cols, sids, bootstrap=50).intervals == \
        C.with_interval(sgt, [dict(r) for r in srows], sids, 50).intervals


def test_round_like_python_on_adversarial_values():
    """Halfway points of the 3rd / 5th decimal and their neighbours, exact binary ties, signs, zeros."""
    rng = np.random.default_rng(0)
    k = rng.integers(0, 2_000_000, 20_000)
    half = (k + 0.5) / 1000
    v = np.concatenate([half, np.nextafter(half, 0), np.nextafter(half, np.inf), -half[:500],
                        rng.integers(-3000, 30000, 5000) / 16,  # exact ties in binary, e.g. 1.0625
                        (rng.random(20_000) * 1000).astype(np.float32).astype(np.float64),
                        [0.0, -0.0, -1e-4, 1e-300, np.inf, 123456789.0005]])
    for nd, vals in ((3, v), (5, np.concatenate([(k + 0.5) / 1e5, np.nextafter((k + 0.5) / 1e5, 0)]))):
        want = np.array([round(x, nd) for x in vals.tolist()])
        assert not np.array_equal(_bits(np.round(vals, nd)), _bits(want))  # numpy alone gets some wrong
        assert np.array_equal(_bits(C.round_like_python(vals, nd)), _bits(want))
    assert np.array_equal(_bits(C.round_like_python(np.array([[np.nan]]), 3)), _bits(np.array([[np.nan]])))
