"""benchmarks/gpu_check.py --dry-run: every part at tiny sizes on the CPU, every summary field filled."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_full_run_fits_the_issue():
    g = _module()
    assert g.FULL["models"] == ("yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x")
    assert (g.FULL["images"], g.FULL["batch"], g.FULL["sweep_points"]) == (5000, 32, 10)


@pytest.mark.slow
def test_dry_run_fills_every_field_the_gpu_run_fills(tmp_path, assets):
    g = _module()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--cache", str(assets)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "gpu_check.json").read_text())
    assert set(s) == set(g.SUMMARY_FIELDS) and s["dry_run"] is True
    for run in g.ACCURACY_RUNS:
        assert set(s["accuracy"][run]) == set(g.ACCURACY_FIELDS)
        assert 0 < s["accuracy"][run]["mAP50-95"] <= 1 and s["accuracy"][run]["images"] == g.DRY["acc_limit"]
    assert set(s["accuracy"]["delta_vs_cpu"]) == {"cuda_fp32", "cuda_fp16"}
    assert [x["model"] for x in s["stage_split"]] == list(g.DRY["models"])
    for split in s["stage_split"]:
        assert set(split) == set(g.STAGE_FIELDS) and split["images"] == g.DRY["images"]
        assert set(split["seconds"]) == set(g.STAGES) and split["seconds"]["forward"] > 0
        assert set(split["gpu_utilization"]) == set(g.UTIL_FIELDS)
    points = s["sparsity_sweep"]["points"]
    assert len(points) == g.DRY["sweep_points"] and all(set(p) == set(g.SWEEP_FIELDS) for p in points)
    assert points[-1]["sparsity_measured"] > points[0]["sparsity_measured"]
    replay = s["replay_pipeline"]
    assert set(replay) == set(g.REPLAY_FIELDS) and replay["images"] == g.DRY["replay_images"]
    assert replay["images_per_s"] > 0 and "coco_eval" in replay["seconds"]
    assert set(s["gpu_utilization"]) == set(g.UTIL_FIELDS) and s["seconds_total"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "## Stage split" in md and "## Sparsity sweep" in md and "cuda_fp16" in md
