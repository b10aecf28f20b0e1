"""Report stage: MLflow runs of a sweep -> figures, tables and a PDF.

``build_report(tracking_uri, experiment, sweep=None, out_root=None, parent_run_id=None, attach=True)``
writes ``<out_root>/<sweep id>/`` — accuracy_vs_sparsity.png, retention_vs_sparsity.png,
speed_vs_sparsity.png, pareto.png, sensitivity.png (per-layer sweeps only), report.pdf, results.csv,
results.md — and logs them on the sweep's parent run under ``report/``. CLI: ``python -m sweep.report``.

Runs that differ in dataset, image size or precision (``data.name``, ``eval.imgsz``, ``eval.half``)
are never mixed: each such setting gets its own row of panels, with dense references from the same
setting only (timing figures also split by device). Failed runs stay in results.csv/results.md,
marked, and are left out of the figures. ``ReportError`` when nothing can be reported.
"""

from .build import build_report
from .common import ALL, DEFAULT_EXPERIMENT, REPORT_FILES, ReportError, default_tracking_uri

__all__ = ["ALL", "DEFAULT_EXPERIMENT", "REPORT_FILES", "ReportError", "build_report", "default_tracking_uri"]
