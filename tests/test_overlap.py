"""The overlapped pipeline: COCO evaluation in a worker process, and jobs completed after the next point."""

from __future__ import annotations

import json
import os
import signal

import pytest

from sweep.evaluate.coco import CocoColumns, evaluate_columns
from sweep.evaluate.worker import CocoWorker


def _toy():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900,
                           "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 50, 20, 40], "area": 800,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "thing"}]}
    rows = [{"image_id": 1, "category_id": 1, "bbox": [11.0, 9.5, 30.0, 31.0], "score": 0.9},
            {"image_id": 2, "category_id": 1, "bbox": [50.0, 52.0, 22.0, 35.0], "score": 0.8},
            {"image_id": 2, "category_id": 1, "bbox": [5.0, 5.0, 10.0, 10.0], "score": 0.3}]
    return gt, CocoColumns.from_rows(rows)


def test_the_worker_gives_the_in_process_numbers_and_keeps_the_ground_truth():
    gt, cols = _toy()
    expected = evaluate_columns(gt, cols, [1, 2], "pycocotools").stats
    worker = CocoWorker()
    try:
        first = worker.submit("gt-a", gt, cols, [1, 2], "pycocotools", 0).result()
        # the same key again: the worker evaluates against the ground truth it kept (sent once)
        again = worker.submit("gt-a", {"images": [], "annotations": [], "categories": []}, cols, [1, 2],
                              "pycocotools", 0).result()
    finally:
        worker.shutdown()
    assert first.where == again.where == "worker"
    assert first.result.stats == expected == again.result.stats
    assert first.ended >= first.started


def test_a_worker_that_cannot_start_is_not_started_again_for_every_job(monkeypatch):
    """A process whose worker dies before its first evaluation (e.g. a script read from stdin, which
    ``spawn`` cannot re-import) evaluates in process from then on, instead of paying a start per job."""
    import sweep.evaluate.worker as w

    gt, cols = _toy()
    worker = CocoWorker()
    monkeypatch.setattr(w, "_quiet_worker", _exit_at_start)  # the real worker process, dying as it starts
    first = worker.submit("gt-a", gt, cols, [1, 2], "pycocotools", 0).result()
    second = worker.submit("gt-a", gt, cols, [1, 2], "pycocotools", 0)
    assert first.where == second.result().where == "in-process"
    assert worker._pool is None  # noqa: SLF001 - no second worker was started


def _exit_at_start() -> None:
    os._exit(3)


def test_a_killed_worker_costs_time_not_the_point():
    gt, cols = _toy()
    expected = evaluate_columns(gt, cols, [1, 2], "pycocotools").stats
    worker = CocoWorker()
    try:
        worker.submit("gt-a", gt, cols, [1, 2], "pycocotools", 0).result()  # started
        for pid in list(worker._pool._processes):  # noqa: SLF001 - the real worker process, killed for real
            os.kill(pid, signal.SIGKILL)
        done = worker.submit("gt-a", gt, cols, [1, 2], "pycocotools", 0).result()
        assert done.where == "in-process" and done.result.stats == expected
        later = worker.submit("gt-a", gt, cols, [1, 2], "pycocotools", 0).result()  # a new worker, sent the gt
        assert later.where == "worker" and later.result.stats == expected
    finally:
        worker.shutdown()


@pytest.mark.parametrize("coco_worker", ["true", "false"])
def test_a_job_gives_the_same_numbers_with_the_worker_or_without(tmp_path, assets, coco_worker):
    from helpers import make_cfg

    from sweep.job import JobContext, run_job
    from sweep.memo import ProcessMemo

    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "data.limit=8", "eval.imgsz=320",
                   "mlflow.enabled=false", "sparsity=0.3", f"eval.coco_worker={coco_worker}")
    out = run_job(cfg, JobContext(tmp_path / "job"), ProcessMemo())
    timeline = json.loads((tmp_path / "job" / "timeline.json").read_text())
    assert timeline["coco_where"] == ("worker" if coco_worker == "true" else "in-process")
    # pinned (from running this code): the same figure through either path (the worker only moves the evaluation)
    assert round(out.metrics["mAP50-95"], 4) == 0.1979
    assert out.metrics["seconds_coco_wait"] >= 0 and out.metrics["size_mb_compressed"] > 0



def test_the_same_point_twice_in_a_sequential_sweep_is_evaluated_once_not_waited_for_forever(tmp_path, assets):
    """Regression: two methods at sparsity 0 are one point (one config hash). The second job found the first
    one's run still RUNNING (its completion deferred until after the next forward pass, in this very process)
    and would wait for it forever; it now completes the first job and reuses its result."""
    from helpers import run_cli, runs

    out = tmp_path / "outputs"
    p = run_cli(out, "-m", "model=yolov5n", "data=coco-val128", "data.limit=8", "eval.imgsz=320", "report=false",
                "prune=l1_unstructured,global_l1", "sparsity=0", sweep_dir=tmp_path / "s1", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1 done, 1 skipped, 0 failed" in p.stdout
    finished = runs(out, filter_string="attributes.status = 'FINISHED' and tags.`sweep.role` = 'job'")
    assert len(finished) == 1
