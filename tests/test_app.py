"""One job end to end: the real config, the real checkpoint and data, a real MLflow store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import make_cfg, runs

from sweep.job import JobContext, check_choices, run_job, run_name, semantic_config
from sweep.config.schema import ConfigError, normalize_sparsity, validate
from sweep.memo import SessionCache


# -- config checks (no assets needed) -----------------------------------------------------------
@pytest.mark.parametrize("value", [1.0, -0.1, "abc", float("nan"), True, 1.5])
def test_bad_sparsity_is_refused_with_key_value_and_range(value):
    with pytest.raises(ConfigError) as e:
        normalize_sparsity(value)
    msg = str(e.value)
    assert "sparsity=" in msg and repr(value) in msg and "[0, 1)" in msg


def test_sparsity_float_noise_is_normalised():
    assert normalize_sparsity(0.30000000000000004) == 0.3
    assert normalize_sparsity(0) == 0.0


@pytest.mark.parametrize("override,key", [
    ("eval.imgsz=100", "eval.imgsz"), ("eval.batch=0", "eval.batch"), ("eval.conf=1.5", "eval.conf"),
    ("eval.iou=-0.1", "eval.iou"), ("eval.device=tpu", "eval.device"), ("data.limit=0", "data.limit"),
])
def test_range_checks_name_the_key(tmp_path, override, key):
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_registry_names_and_recover_conflict(tmp_path):
    with pytest.raises(ConfigError, match="prune.method='magic' is unknown: allowed are .*l1_unstructured"):
        check_choices(make_cfg(tmp_path, "model=yolov5n", "prune.method=magic"))
    with pytest.raises(ConfigError, match="prune.fused=true is not allowed"):
        check_choices(make_cfg(tmp_path, "model=yolov5n", "recover=bn"))
    check_choices(make_cfg(tmp_path, "model=yolov5n", "recover=bn", "prune.fused=false"))


def test_run_name_and_hash_semantics(tmp_path):
    import torch

    cpu = torch.device("cpu")
    a = make_cfg(tmp_path, "model=yolov5x", "sparsity=0.3")
    assert run_name(a) == "yolov5x-l1_unstructured-s0.30"
    b = make_cfg(tmp_path, "model=yolov5n", "prune=global_l1", "prune.fused=false", "sparsity=0.5")
    assert run_name(b) == "yolov5n-global_l1-unfused-s0.50"
    # the dense point does not depend on the pruning method; a pruned one does
    d1 = semantic_config(make_cfg(tmp_path, "prune=global_l1", "sparsity=0"), "sha", cpu, False)
    d2 = semantic_config(make_cfg(tmp_path, "prune=random", "sparsity=0"), "sha", cpu, False)
    assert d1 == d2
    p1 = semantic_config(make_cfg(tmp_path, "prune=global_l1", "sparsity=0.3"), "sha", cpu, False)
    p2 = semantic_config(make_cfg(tmp_path, "prune=random", "sparsity=0.3"), "sha", cpu, False)
    assert p1 != p2
    # settings that do not change numbers do not change the hash
    e1 = semantic_config(make_cfg(tmp_path, "eval.workers=0", "mlflow.experiment=x"), "sha", cpu, False)
    e2 = semantic_config(make_cfg(tmp_path, "eval.workers=4"), "sha", cpu, False)
    assert e1 == e2


# -- real assets --------------------------------------------------------------------------------
def test_missing_weights_and_dataset_fail_before_any_run(tmp_path, assets):
    from sweep.data.dataset import DataError

    cfg = make_cfg(tmp_path, "model=custom", f"model.weights={tmp_path / 'nope.pt'}", "data=coco-val128")
    with pytest.raises(Exception, match="nope.pt"):
        run_job(cfg, JobContext(tmp_path / "job"))
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", f"data.path={tmp_path / 'no-such-dataset'}")
    with pytest.raises(DataError, match="no-such-dataset"):
        run_job(cfg, JobContext(tmp_path / "job"))
    assert runs(tmp_path) == []


def test_dense_yolov5n_on_val128_matches_pinned_values(tmp_path, assets):
    """Regression pin: dense yolov5n (v6.1 weights), coco-val128, imgsz 640, batch 32, conf 0.001,
    iou 0.65, FP32 CPU. Values come from running this code; they must be explained if they change."""
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "sparsity=0", "mlflow.enabled=false")
    out = run_job(cfg, JobContext(tmp_path / "job"))
    m = out.metrics
    assert out.status == "done"
    assert m["images"] == 128 and m["instances"] == 898
    assert round(m["mAP50-95"], 3) == 0.343
    assert round(m["mAP50"], 3) == 0.526
    assert round(m["AR100"], 3) == 0.538
    written = json.loads((tmp_path / "job" / "metrics.json").read_text())
    for key in ("mAP50-95", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR1", "AR10", "AR100",
                "AR_small", "AR_medium", "AR_large", "ms_preprocess", "ms_inference", "ms_nms", "images",
                "instances", "model", "data", "sparsity", "sparsity_target", "params", "params_nonzero", "gflops",
                "size_mb", "size_mb_compressed", "sparsity_global"):
        assert key in written, key
    assert written["model"] == "yolov5n" and written["data"] == "coco-val128" and written["sparsity_target"] == 0.0
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in written.values())


def test_pruned_job_logs_a_complete_mlflow_run(tmp_path, assets):
    cache = SessionCache()
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "data.limit=8", "eval.imgsz=320",
                   "sparsity=0.3", "eval.save_json=true")
    out = run_job(cfg, JobContext(tmp_path / "job", overrides=["sparsity=0.3"]), cache)
    assert out.status == "done"
    [run] = runs(tmp_path)
    assert run.info.status == "FINISHED" and run.info.run_name == "yolov5n-l1_unstructured-s0.30"
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["model.name"] == "yolov5n" and p["prune.method"] == "l1_unstructured" and p["sparsity"] == "0.3"
    assert len(p["model.sha256"]) == 64 and p["eval.imgsz"] == "320" and p["prune.fused"] == "True"
    assert abs(m["sparsity"] - 0.3) < 1e-3 and m["sparsity_target"] == 0.3
    for key in ("mAP50-95", "AR100", "ms_inference", "params_nonzero", "gflops", "size_mb_compressed"):
        assert key in m
    assert t["config_hash"] and t["torch"] and t["overrides"] == "sparsity=0.3"
    from mlflow.tracking import MlflowClient
    from helpers import store_uri

    arts = {a.path for a in MlflowClient(store_uri(tmp_path)).list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "layer_sparsity.csv", "per_class_ap.csv", "predictions.json"} <= arts
    # same config again: skipped, no new run; resume=false forces a re-run
    again = run_job(cfg, JobContext(tmp_path / "job2"), cache)
    assert again.status == "skipped" and again.run_id == run.info.run_id
    assert len(runs(tmp_path)) == 1
    cfg_force = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "data.limit=8", "eval.imgsz=320",
                         "sparsity=0.3", "eval.save_json=true", "resume=false")
    assert run_job(cfg_force, JobContext(tmp_path / "job3"), cache).status == "done"
    assert len(runs(tmp_path)) == 2


def test_zero_detections_report_zeros_and_finish(tmp_path, assets):
    """A model that detects nothing (conf threshold 1.0 here) finishes with every COCO number 0."""
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "data.limit=4", "eval.imgsz=320",
                   "eval.conf=1.0", "mlflow.enabled=false")
    out = run_job(cfg, JobContext(tmp_path / "job"))
    assert out.status == "done" and out.metrics["detections"] == 0
    assert out.metrics["mAP50-95"] == 0.0 and out.metrics["AR100"] == 0.0


def test_corrupt_checkpoint_ends_its_run_failed(tmp_path, assets):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes((assets / "weights" / "yolov5n.pt").read_bytes()[:100_000])
    cfg = make_cfg(tmp_path, "model=custom", f"model.weights={bad}", "data=coco-val128", "data.limit=4",
                   "eval.imgsz=320")
    with pytest.raises(Exception):
        run_job(cfg, JobContext(tmp_path / "job"))
    [run] = runs(tmp_path)
    assert run.info.status == "FAILED" and "corrupt.pt" in run.data.tags["error"]
    assert (tmp_path / "job" / "traceback.txt").is_file()


def test_calibrating_on_evaluation_images_is_refused_before_any_run(tmp_path, val128_dir):
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "prune.fused=false", "recover=bn",
                   "sparsity=0.3", f"recover.data={val128_dir / 'images' / 'val2017'}")
    with pytest.raises(ConfigError, match="also evaluation images"):
        run_job(cfg, JobContext(tmp_path / "job"))
    assert runs(tmp_path) == []


@pytest.mark.parametrize("method", ["l1_unstructured", "global_l1", "random", "ln_structured", "channel"])
def test_every_pruning_method_runs_a_job_with_its_accounting(tmp_path, assets, method):
    cache = _SHARED
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "data.limit=4", "eval.imgsz=320",
                   f"prune={method}", "sparsity=0.3", "mlflow.enabled=false")
    m = run_job(cfg, JobContext(tmp_path / "job"), cache).metrics
    written = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert written["prune_method"] == method and written["sparsity_target"] == 0.3
    if method == "channel":   # channels removed, not zeroed: the cost drops
        assert m["params_ratio"] < 0.7 and m["gflops_ratio"] < 0.7
    else:                     # zeros in dense tensors: same cost, fewer non-zeros
        assert m["params_ratio"] == 1.0 and m["params_nonzero"] < 0.8 * m["params"]
        assert abs(m["sparsity"] - 0.3) < 0.03  # ln_structured rounds whole filters per layer
    assert (tmp_path / "job" / "layer_sparsity.csv").is_file()


_SHARED = SessionCache()


@pytest.mark.parametrize("relative", [True, False])
def test_coco_val128_calibration_split_resolves_with_a_relative_or_absolute_cache(tmp_path, assets, relative):
    import os

    from sweep.assets import cache_root

    cache = os.path.relpath(assets) if relative else str(assets)  # the README's SWEEP_CACHE=../shared/assets
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "prune.fused=false", "recover=bn",
                   f"paths.cache={cache}")
    session = SessionCache()
    spec = session.data_spec(cfg.data, cache_root(cfg.paths.cache))
    cal = session.calibration(cfg, spec, "cpu")
    assert len(cal.files) == 128
    assert all(Path(f).resolve().parent == (assets / "datasets" / "coco128-calib" / "images" / "train2017").resolve()
               for f in cal.files)


def test_a_single_run_closes_runs_left_running_by_dead_processes_of_this_host(tmp_path, assets):
    import platform
    import subprocess
    import sys

    from sweep.track.tracker import Tracker

    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "data.limit=4", "eval.imgsz=320", "sparsity=0.3")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tracker = Tracker.from_config(cfg)
    orphan = tracker.start_run("killed-earlier", {"host": platform.node(), "pid": str(dead.pid)})
    out = run_job(cfg, JobContext(tmp_path / "job"))
    assert out.status == "done"
    closed = tracker.client.get_run(orphan)
    assert closed.info.status == "FAILED" and closed.data.tags["error"].startswith("orphaned:")
    assert tracker.client.get_run(out.run_id).info.status == "FINISHED"
