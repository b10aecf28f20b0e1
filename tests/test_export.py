"""ONNX export, ONNX Runtime latency and the output-match check (eval.runtimes=[torch,onnxruntime])."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import make_cfg

from sweep import contract
from sweep.config.schema import ConfigError
from sweep.config.spec import PruneSpec
from sweep.export import (ATOL, RTOL, OutputMismatchError, check_outputs, export_onnx, measure_ort_latency,
                          onnx_runtime_latency, ort_session)
from sweep.job import JobContext, run_job
from sweep.memo import ProcessMemo
from sweep.model import fuse
from sweep.prune import PRUNERS

pytest.importorskip("onnxruntime")

IMGSZ = 128  # small input: the check is about the graph, not the image size


@pytest.fixture(scope="module")
def v5n_channel(v5n):
    return PRUNERS["channel"](fuse(copy.deepcopy(v5n)), 0.5, PruneSpec("channel"))


def test_exported_model_matches_pytorch_within_the_stated_tolerance(tmp_path, v5n_fused):
    path = export_onnx(v5n_fused, tmp_path / "m.onnx", IMGSZ)
    session = ort_session(path)
    for batch in (1, 3):  # the batch axis is dynamic
        match = check_outputs(v5n_fused, session, IMGSZ, batch=batch)
        assert match.worst_excess <= 0 and match.max_abs_diff < 0.05
    assert (RTOL, ATOL) == (1e-3, 1e-3)  # the tolerance docs/deploy.md states
    assert measure_ort_latency(session, IMGSZ, batch=2, iters=1) > 0


def test_a_different_model_fails_the_output_check(tmp_path, v5n_fused):
    """The failing case: ONNX Runtime runs a graph whose weights differ from the PyTorch model's."""
    other = copy.deepcopy(v5n_fused)
    with torch.no_grad():
        other.model[0].conv.weight.mul_(1.5)
    session = ort_session(export_onnx(other, tmp_path / "other.onnx", IMGSZ))
    with pytest.raises(OutputMismatchError, match="beyond the tolerance"):
        check_outputs(v5n_fused, session, IMGSZ)


def test_a_zero_tolerance_also_fails_on_float_noise(tmp_path, v5n_fused):
    """The check compares element by element: ORT's kernels round differently from PyTorch's."""
    session = ort_session(export_onnx(v5n_fused, tmp_path / "m.onnx", IMGSZ))
    match = check_outputs(v5n_fused, session, IMGSZ)
    if match.max_abs_diff > 0:
        with pytest.raises(OutputMismatchError):
            check_outputs(v5n_fused, session, IMGSZ, rtol=0.0, atol=0.0)


def test_channel_pruned_graph_is_smaller_and_matches(tmp_path, v5n_fused, v5n_channel):
    dense = onnx_runtime_latency(v5n_fused, tmp_path / "d.onnx", imgsz=IMGSZ, batch=2, iters=2)
    pruned = onnx_runtime_latency(v5n_channel, tmp_path / "p.onnx", imgsz=IMGSZ, batch=2, iters=2,
                                  reference=v5n_fused)
    assert pruned.dense_b1_ms > 0 and pruned.speedup_b1 == pytest.approx(pruned.dense_b1_ms / pruned.b1_ms)
    assert dense.speedup_b1 is None
    assert pruned.onnx_mb < 0.5 * dense.onnx_mb  # channel 0.5 keeps about a quarter of the weights
    assert pruned.provider == "CPUExecutionProvider" and pruned.b1_ms > 0 and pruned.batch_ms_per_image > 0


def test_metric_names_come_from_the_contract():
    assert contract.ort_latency_batch_metric(32) == "ort_latency_b32_ms_per_image"
    assert contract.ort_latency_batch_of("ort_latency_b32_ms_per_image") == 32
    assert contract.latency_batch_of("ort_latency_b32_ms_per_image") is None  # not taken for a PyTorch one
    assert contract.ORT_LATENCY_B1 == "ort_latency_b1_ms"


@pytest.mark.parametrize("value", ["[tensorrt]", "[]", "[torch,torch]"])
def test_bad_runtimes_are_refused_naming_the_key(tmp_path, value):
    cfg = make_cfg(tmp_path, f"eval.runtimes={value}")
    with pytest.raises(ConfigError, match=r"eval\.runtimes=.*torch, onnxruntime"):
        run_job(cfg, JobContext(tmp_path / "job"))


def test_job_reports_onnx_runtime_latency_and_the_artifact(tmp_path, assets):
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "data.limit=4", f"eval.imgsz={IMGSZ}",
                   "eval.batch=2", "eval.latency=true", "eval.latency_iters=2", "prune=channel", "sparsity=0.3",
                   "eval.runtimes=[torch,onnxruntime]", "prune.save=true", "mlflow.enabled=false")
    m = run_job(cfg, JobContext(tmp_path / "job"), ProcessMemo()).metrics
    for name in (contract.LATENCY_B1, contract.latency_batch_metric(2), contract.ORT_LATENCY_B1,
                 contract.ort_latency_batch_metric(2), contract.ARTIFACT_MB, contract.ARTIFACT_MB_COMPRESSED):
        assert m[name] > 0, name
    assert m[contract.ORT_SPEEDUP_B1] > 0 and m[contract.ORT_LATENCY_DENSE_B1] > 0
    assert m[contract.ORT_MAX_ABS_DIFF] < 0.05 and m[contract.ORT_PROVIDER] == "CPUExecutionProvider"
    assert m[contract.ARTIFACT_MB_COMPRESSED] < m[contract.ARTIFACT_MB]
    job = tmp_path / "job"
    assert {"pruned.safetensors", "pruned.json", "pruned.onnx"} <= {p.name for p in job.iterdir()}
    assert not list(job.glob("*.pt"))  # the old pickle output is gone
    written = json.loads((job / "metrics.json").read_text())
    assert written[contract.ORT_LATENCY_B1] == m[contract.ORT_LATENCY_B1]


def test_layer_profile_attributes_time_to_every_layer(v5n_fused, v5n_channel):
    from sweep.export.profile import layer_profile

    dense = layer_profile(v5n_fused, imgsz=IMGSZ, iters=1)
    pruned = layer_profile(v5n_channel, imgsz=IMGSZ, iters=1)
    assert list(dense["layer"]) == list(range(len(v5n_fused.model))) and (dense["cpu_ms"] > 0).all()
    assert dense["share"].sum() == pytest.approx(1.0)
    assert pruned.loc[0, "out_channels"] < dense.loc[0, "out_channels"]  # the pruned widths are listed


def test_eval_profile_writes_where_the_time_goes_and_the_report_draws_it(tmp_path, assets):
    """eval.profile=true: the job's layer_profile.csv holds every layer of the pruned model beside the dense one
    (same input, same process) and the report draws layer_time.png from the runs' artifacts."""
    import pandas as pd

    from sweep.report import build_report

    out = tmp_path / "outputs"
    cfg = make_cfg(out, "model=yolov5n", "data=coco-val128", "data.limit=4", f"eval.imgsz={IMGSZ}",
                   "eval.latency=false", "prune=channel", "sparsity=0.5", "eval.profile=true")
    m = run_job(cfg, JobContext(tmp_path / "job"), ProcessMemo()).metrics
    table = pd.read_csv(tmp_path / "job" / contract.LAYER_PROFILE_CSV)
    assert len(table) == 25 and (table["ms"] > 0).all() and (table["dense_ms"] > 0).all()
    assert m[contract.PROFILE_MS_B1] == pytest.approx(table["ms"].sum())
    assert m[contract.PROFILE_DENSE_MS_B1] == pytest.approx(table["dense_ms"].sum())
    assert (table.loc[0:9, "out_channels"] < table.loc[0:9, "dense_out_channels"]).all()  # the pruned widths
    detect = table.iloc[-1]
    assert detect["type"] == "Detect" and detect["params"] < detect["dense_params"]  # inputs shrank, outputs kept
    report = build_report(f"sqlite:///{out / 'mlflow.db'}", "yolov5-sparsity", sweep="all", out_root=tmp_path / "reports")
    assert (report / "layer_time.png").stat().st_size > 10_000
