"""One job end to end: the real config, the real checkpoint and data, a real MLflow store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import make_cfg, runs

from sweep import contract
from sweep.config.resolve import config_hash, normalize_sparsity, resolve_job, semantic_config
from sweep.config.schema import ConfigError
from sweep.job import JobContext, run_job
from sweep.memo import ProcessMemo


# -- config checks (no assets needed) -----------------------------------------------------------
@pytest.mark.parametrize("value", [1.0, -0.1, "abc", float("nan"), True, 1.5, 0.9999999])
def test_bad_sparsity_is_refused_with_key_value_and_range(value):
    with pytest.raises(ConfigError) as e:
        normalize_sparsity(value)
    msg = str(e.value)
    assert "sparsity=" in msg and repr(value) in msg and "[0, 1)" in msg


def test_sparsity_float_noise_is_normalised():
    assert normalize_sparsity(0.30000000000000004) == 0.3
    assert normalize_sparsity(0) == 0.0
    assert normalize_sparsity(0.999999) == 0.999999


@pytest.mark.parametrize("override,key", [
    ("eval.imgsz=100", "eval.imgsz"), ("eval.batch=0", "eval.batch"), ("eval.conf=1.5", "eval.conf"),
    ("eval.iou=-0.1", "eval.iou"), ("eval.device=tpu", "eval.device"), ("data.limit=0", "data.limit"),
    ("prune.round_to=0", "prune.round_to"), ("recover.images=0", "recover.images"),
    ("mlflow.tracking_uri=ftp://x", "mlflow.tracking_uri"),
])
def test_range_checks_name_the_key(tmp_path, override, key):
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_job(cfg, ProcessMemo())


def test_registry_names_and_recover_conflict(tmp_path):
    with pytest.raises(ConfigError, match="prune.method='magic' is unknown: allowed are .*l1_unstructured"):
        resolve_job(make_cfg(tmp_path, "model=yolov5n", "prune.method=magic"), ProcessMemo())
    with pytest.raises(ConfigError, match="prune.fused=true is not allowed"):
        resolve_job(make_cfg(tmp_path, "model=yolov5n", "recover=bn"), ProcessMemo())


def test_custom_model_without_weights_is_a_config_error_not_a_download(tmp_path):
    with pytest.raises(ConfigError, match="model.weights is not set"):
        resolve_job(make_cfg(tmp_path, "model=custom"), ProcessMemo())


def test_outputs_pointing_at_a_file_is_a_config_error(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    cfg = make_cfg(tmp_path, "model=yolov5n")
    cfg.paths.outputs = str(f)
    with pytest.raises(ConfigError, match="paths.outputs=.*is a file"):
        resolve_job(cfg, ProcessMemo())


def test_run_name_and_hash_semantics(tmp_path):
    import torch

    cpu = torch.device("cpu")
    assert contract.run_name("yolov5x", "l1_unstructured", True, "none", 0.3) == "yolov5x-l1_unstructured-s0.30"
    assert contract.run_name("yolov5n", "global_l1", False, "none", 0.5) == "yolov5n-global_l1-unfused-s0.50"

    def semantic(*overrides: str) -> dict:
        from helpers import resolved_container

        c = resolved_container(make_cfg(tmp_path, *overrides))
        return semantic_config(c, "sha", cpu, False, float(c["sparsity"]))

    # the dense point does not depend on the pruning method; a pruned one does
    assert semantic("prune=global_l1", "sparsity=0") == semantic("prune=random", "sparsity=0")
    assert semantic("prune=global_l1", "sparsity=0.3") != semantic("prune=random", "sparsity=0.3")
    # settings that do not change numbers do not change the hash
    assert semantic("eval.workers=0", "mlflow.experiment=x") == semantic("eval.workers=4")
    assert config_hash(semantic("sparsity=0.3")) != config_hash(semantic("sparsity=0.5"))


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
    cache = ProcessMemo()
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


def test_corrupt_checkpoint_is_refused_before_any_run(tmp_path, assets):
    """The pre-flight opens the checkpoint: a truncated file is an input error, not a FAILED run."""
    from sweep.model import CheckpointError

    bad = tmp_path / "corrupt.pt"
    bad.write_bytes((assets / "weights" / "yolov5n.pt").read_bytes()[:100_000])
    cfg = make_cfg(tmp_path, "model=custom", f"model.weights={bad}", "data=coco-val128", "data.limit=4",
                   "eval.imgsz=320")
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        run_job(cfg, JobContext(tmp_path / "job"))
    assert runs(tmp_path) == [] and not (tmp_path / "job").exists()


def test_an_error_during_the_job_ends_its_run_failed(tmp_path, assets):
    """After the run exists, a failure ends it FAILED with the error tag and the traceback artifact."""
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "data.limit=4", "eval.imgsz=320",
                   "sparsity=0.3", "prune.save=true")
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "pruned.safetensors").mkdir()  # the weights cannot be written over a folder
    with pytest.raises(Exception):
        run_job(cfg, JobContext(tmp_path / "job"))
    [run] = runs(tmp_path)
    assert run.info.status == "FAILED" and "pruned.safetensors" in run.data.tags["error"]
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


_SHARED = ProcessMemo()


@pytest.mark.parametrize("relative", [True, False])
def test_coco_val128_calibration_split_resolves_with_a_relative_or_absolute_cache(tmp_path, assets, relative):
    import os

    cache = os.path.relpath(assets) if relative else str(assets)  # the README's SWEEP_CACHE=../shared/assets
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "prune.fused=false", "recover=bn",
                   f"paths.cache={cache}")
    memo = ProcessMemo()
    spec = resolve_job(cfg, memo)
    [cal] = memo.calib.values()
    assert spec.recover.source_key == "data.train" and len(cal.files) == 128
    assert all(Path(f).resolve().parent == (assets / "datasets" / "coco128" / "images" / "train2017").resolve()
               for f in cal.files)
    # the labeled coco128 holds the very images of coco128-calib: BatchNorm calibration is unchanged
    calib = sorted(p.name for p in (assets / "datasets" / "coco128-calib" / "images" / "train2017").glob("*.jpg"))
    assert [Path(f).name for f in cal.files] == calib


def test_a_single_run_closes_runs_left_running_by_dead_processes_of_this_host(tmp_path, assets):
    import platform
    import subprocess
    import sys

    from sweep.config.resolve import resolve_tracking
    from sweep.track.tracker import Tracker

    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "data.limit=4", "eval.imgsz=320", "sparsity=0.3")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tracker = Tracker.from_spec(resolve_tracking(cfg))
    orphan = tracker.start_run("killed-earlier", {"host": platform.node(), "pid": str(dead.pid)})
    out = run_job(cfg, JobContext(tmp_path / "job"))
    assert out.status == "done"
    closed = tracker.client.get_run(orphan)
    assert closed.info.status == "FAILED" and closed.data.tags["error"].startswith("orphaned:")
    assert tracker.client.get_run(out.run_id).info.status == "FINISHED"
