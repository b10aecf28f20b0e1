"""Names shared by the report modules: the error type, the report's files and defaults.

Metric names, tag keys, the experiment name and the default store come from ``sweep.contract``.
"""

from __future__ import annotations

from pathlib import Path

from sweep.contract import DEFAULT_EXPERIMENT, DEFAULT_OUTPUTS, tracking_uri

ALL = "all"  # sweep="all": every finished job run of the experiment

# Files one report consists of (sensitivity.png only for per-layer sweeps).
REPORT_FILES = ("accuracy_vs_sparsity.png", "retention_vs_sparsity.png", "speed_vs_sparsity.png",
                "pareto.png", "sensitivity.png", "report.pdf", "results.csv", "results.md")
ARTIFACT_DIR = "report"

__all__ = ["ALL", "ARTIFACT_DIR", "DEFAULT_EXPERIMENT", "REPORT_FILES", "ReportError", "default_out_root",
           "default_tracking_uri", "metric", "param", "plural"]


class ReportError(RuntimeError):
    """The report cannot be built; the message says why and what to do."""


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the job's default store ``sqlite:///<abs cwd>/outputs/mlflow.db``."""
    return tracking_uri(None, DEFAULT_OUTPUTS)


def default_out_root() -> Path:
    return (Path.cwd() / DEFAULT_OUTPUTS / "reports").resolve()


def metric(name: str) -> str:
    """Column name of an MLflow metric in the run frames."""
    return f"metrics.{name}"


def param(name: str) -> str:
    """Column name of an MLflow param in the run frames."""
    return f"params.{name}"


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 run``, ``2 runs`` (``many`` for an irregular plural)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"
