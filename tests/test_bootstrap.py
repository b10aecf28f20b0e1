"""Bootstrap confidence intervals (eval.bootstrap): the resampled accumulate against COCOeval's own, on the
real yolov5n detections of coco-val128, and the job's metrics and resume rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import make_cfg, runs

from sweep import contract
from sweep.config.resolve import check_values, resolve_job
from sweep.config.schema import ConfigError
from sweep.evaluate import bootstrap as B
from sweep.evaluate import coco as C
from sweep.job import JobContext, run_job
from sweep.memo import ProcessMemo


@pytest.fixture(scope="module")
def detections(tmp_path_factory, assets):
    """(ground truth, result rows, image ids) of dense yolov5n on the 128 images, as the job evaluates them."""
    out = tmp_path_factory.mktemp("boot")
    cfg = make_cfg(out, "model=yolov5n", "data=coco-val128", "sparsity=0", "eval.save_json=true",
                   "mlflow.enabled=false")
    memo = ProcessMemo()
    run_job(cfg, JobContext(out / "job"), memo)
    rows = json.loads((out / "job" / "predictions.json").read_text())
    spec = resolve_job(cfg, memo)  # the memo's: what the job evaluated against
    ckpt = memo.checkpoint(spec.model.weights, spec.model.sha256)
    data = memo.eval_data(spec.data, spec.eval, int(ckpt.stride.max()), ckpt.names, spec.model.weights)
    return data.ground_truth, rows, list(data.image_ids)


@pytest.fixture(scope="module")
def evaluated(detections):
    gt, rows, ids = detections
    result, ev = C._pycocotools_eval(gt, rows, ids)
    return result, ev, B.match_table(ev.evalImgs, ev.params)


def test_identity_resample_reproduces_cocoeval_exactly(evaluated):
    """All weights 1: COCOeval's precision [T,R,K,A] at maxDets 100, recall [T,K,A,M] and 12 stats, bit for bit."""
    _, ev, table = evaluated
    precision, recall = B.accumulate(table, np.ones((1, table.n_images)))
    assert np.array_equal(precision[0], ev.eval["precision"][..., -1])
    assert np.array_equal(recall[0], ev.eval["recall"])
    assert np.array_equal(B.summarize(table, precision, recall)[0], ev.stats)


def test_a_weighting_equals_cocoeval_on_the_explicitly_resampled_images(detections, evaluated):
    """Weights 0/1/2/3 = COCOeval run on a data set where each image appears that many times (new ids), up to
    the order of tied scores."""
    gt, rows, ids = detections
    _, ev, table = evaluated
    order = list(ev.params.imgIds)  # the matching's image order (sorted ids)
    w = np.random.default_rng(3).integers(0, 4, len(order))
    by_image: dict = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    anns: dict = {}
    for a in gt["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    images = {im["id"]: im for im in gt["images"]}
    gt2 = {"images": [], "annotations": [], "categories": gt["categories"]}
    rows2, new_ids = [], []
    for i, image_id in enumerate(order):
        for c in range(w[i]):
            nid = len(new_ids) + 1  # increasing: the copies keep the images' order, copies side by side
            new_ids.append(nid)
            gt2["images"].append({**images[image_id], "id": nid})
            gt2["annotations"] += [{**a, "image_id": nid, "id": len(gt2["annotations"]) + 1 + k}
                                   for k, a in enumerate(anns.get(image_id, []))]
            rows2 += [{**r, "image_id": nid} for r in by_image.get(image_id, [])]
    _, ev2 = C._pycocotools_eval(gt2, rows2, new_ids)
    precision, recall = B.accumulate(table, w[None])
    assert np.array_equal(recall[0], ev2.eval["recall"])
    # equal but for the order of detections tied in score within one image (the copies of a detection stay
    # together here, COCOeval interleaves the copies of a tied group): a few precision entries move by < 1e-4
    diff = np.abs(precision[0] - ev2.eval["precision"][..., -1])
    assert diff.max() < 1e-4 and (diff > 0).mean() < 1e-3
    assert np.allclose(B.summarize(table, precision, recall)[0], ev2.stats, rtol=0, atol=1e-7)


def test_the_interval_contains_the_estimate_and_is_seeded(detections):
    gt, rows, ids = detections
    res = C.with_interval(gt, rows, ids, 200)
    assert res.resamples == 200 and set(res.intervals) == set(C.STAT_NAMES)
    for name, (lo, hi) in res.intervals.items():
        assert lo <= res.stats[name] <= hi, (name, lo, res.stats[name], hi)
        assert hi - lo > 0.005, name  # 128 images: a real spread, not a degenerate interval
    again = C.with_interval(gt, rows, ids, 200)
    assert again.intervals == res.intervals                         # fixed seed: the same interval
    assert C.with_interval(gt, rows, ids, 200, seed=1).intervals != res.intervals
    assert res.stats == C._pycocotools(gt, rows, ids).stats             # the point estimate is untouched
    # the evaluation: a bootstrap runs through pycocotools whatever the backend; no detections give 0 intervals
    via = C.evaluate_columns(gt, C.CocoColumns.from_rows(rows), ids, "faster", bootstrap=200)
    assert via.intervals == res.intervals and via.resamples == 200 and via.stats == res.stats
    empty = C.CocoEvaluator(gt, "faster", ids, bootstrap=200).evaluate()
    assert empty.resamples == 200 and empty.intervals == {k: (0.0, 0.0) for k in C.STAT_NAMES}
    assert C.CocoEvaluator(gt, "faster", ids).evaluate().intervals == {}  # no bootstrap asked: no interval


def test_the_interval_shrinks_with_more_images(detections):
    gt, rows, ids = detections
    few = sorted(ids)[:32]
    keep = set(few)
    small = C.with_interval(gt, [r for r in rows if r["image_id"] in keep], few, 200)
    full = C.with_interval(gt, rows, ids, 200)
    for name in ("mAP50-95", "mAP50", "AR100"):
        w32, w128 = (r.intervals[name][1] - r.intervals[name][0] for r in (small, full))
        assert w128 < 0.8 * w32, (name, w32, w128)  # about 1/sqrt(4) in theory


def test_percentile_interval_leaves_undefined_resamples_out():
    s = np.array([[0.1, -1.0], [0.3, -1.0], [0.2, -1.0], [-1.0, -1.0]])
    lo, hi = B.percentile_interval(s, level=0.5)
    assert lo[0] == pytest.approx(0.15) and hi[0] == pytest.approx(0.25)
    assert lo[1] == hi[1] == -1.0


def test_resample_weights_draw_n_images_each():
    w = B.resample_weights(np.random.default_rng(0), 7, 50)
    assert w.shape == (7, 50) and (w.sum(axis=1) == 50).all()
    chunked = np.concatenate([B.resample_weights(r := np.random.default_rng(0), 3, 50),
                              B.resample_weights(r, 4, 50)])
    assert np.array_equal(w, chunked)  # the draws do not depend on the chunk size


@pytest.mark.parametrize("value", [-1, 1.5, "abc", True])
def test_bad_bootstrap_value_is_one_clear_message(tmp_path, value):
    cfg = make_cfg(tmp_path, "model=yolov5n", f"eval.bootstrap={str(value).lower() if value is True else value}")
    with pytest.raises(ConfigError, match=r"eval\.bootstrap=.* is invalid: allowed is an integer >= 0"):
        check_values(cfg)


def test_job_logs_the_interval_and_resume_reruns_a_point_without_it(tmp_path, assets):
    """eval.bootstrap is not in the config hash: a finished run without the interval is measured again when one
    is asked for; a run with it satisfies both a bootstrap and a plain rerun."""
    memo = ProcessMemo()

    def job(i: int, n: int):
        cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "data.limit=16", "sparsity=0",
                       f"eval.bootstrap={n}")
        return run_job(cfg, JobContext(tmp_path / f"job{i}"), memo)

    assert job(0, 0).status == "done"
    second = job(1, 20)
    assert second.status == "done"  # re-run: the first run has no interval
    lo, hi = contract.interval_metrics("mAP50-95")
    assert second.metrics[lo] <= second.metrics["mAP50-95"] <= second.metrics[hi]
    assert job(2, 0).status == "skipped" and job(3, 20).status == "skipped" and job(4, 10).status == "skipped"
    finished = {r.info.run_id: r for r in runs(tmp_path)}
    logged = finished[second.run_id].data.metrics
    assert logged[contract.BOOTSTRAP_RESAMPLES] == 20
    for name in C.STAT_NAMES:
        assert set(contract.interval_metrics(name)) <= set(logged)
    assert len({r.data.tags[contract.TAG_CONFIG_HASH] for r in finished.values()}) == 1
