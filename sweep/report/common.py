"""Names shared by the report modules: the error type, defaults and the metric vocabulary."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_EXPERIMENT = "yolov5-sparsity"
ALL = "all"  # sweep="all": every finished job run of the experiment

COCO_METRICS = ("mAP50-95", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
                "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
SPEED_METRICS = ("ms_preprocess", "ms_inference", "ms_nms")  # per image
COST_METRICS = ("sparsity_target", "sparsity", "sparsity_global", "params", "params_nonzero",
                "gflops", "size_mb", "size_mb_compressed")
LATENCY_METRICS = ("latency_b1_ms", "latency_b32_ms_per_image")
METRIC_ORDER = COCO_METRICS + SPEED_METRICS + ("images", "instances") + COST_METRICS + LATENCY_METRICS

# Files one report consists of (sensitivity.png only for per-layer sweeps).
REPORT_FILES = ("accuracy_vs_sparsity.png", "retention_vs_sparsity.png", "speed_vs_sparsity.png",
                "pareto.png", "sensitivity.png", "report.pdf", "results.csv", "results.md")
ARTIFACT_DIR = "report"


class ReportError(RuntimeError):
    """The report cannot be built; the message says why and what to do."""


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the project's default store ``sqlite:///<abs cwd>/outputs/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path.cwd() / 'outputs' / 'mlflow.db').resolve()}"


def default_out_root() -> Path:
    return (Path.cwd() / "outputs" / "reports").resolve()


def metric(name: str) -> str:
    """Column name of an MLflow metric in the run frames."""
    return f"metrics.{name}"


def param(name: str) -> str:
    """Column name of an MLflow param in the run frames."""
    return f"params.{name}"
