"""Hydra callback for multiruns: the sweep's MLflow parent run, the summary, the report.

- ``on_multirun_start``: checks the tracking store is reachable (a clear error before any
  evaluation) and creates the parent run tagged with the sweep id (the sweep dir's name).
  Jobs, in this process or in launcher workers, find it by that tag.
- ``on_multirun_end``: reads each job's ``outcome.json`` from the sweep dir, prints the
  done / skipped / failed table, closes the parent run, builds the report (best effort:
  a report failure is logged, never hides the sweep's own result), and exits non-zero
  when any job failed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _tracker(config: DictConfig) -> Any:
    from sweep.tracking import Tracker

    return Tracker.from_config(config)


def read_outcomes(sweep_dir: Path) -> list[dict[str, Any]]:
    """Outcomes of the jobs of one sweep, in job order."""
    out = []
    for f in sorted(sweep_dir.glob("*/outcome.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        d["job"] = f.parent.name
        out.append(d)
    return out


def summary_table(outcomes: list[dict[str, Any]]) -> str:
    lines = [f"{'job':>4}  {'status':<8} {'run':<44} {'mAP50-95':>8} {'AR100':>6}  reason"]
    for o in outcomes:
        m = o.get("metrics") or {}
        ap = f"{m['mAP50-95']:.4f}" if "mAP50-95" in m else "-"
        ar = f"{m['AR100']:.3f}" if "AR100" in m else "-"
        lines.append(f"{o['job']:>4}  {o['status']:<8} {o['name']:<44} {ap:>8} {ar:>6}  {o.get('reason', '')}")
    counts = {s: sum(o["status"] == s for o in outcomes) for s in ("done", "skipped", "failed")}
    lines.append(f"sweep: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed")
    return "\n".join(lines)


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.parent_run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.mlflow.enabled:
            return
        from sweep.app import environment_tags
        from sweep.tracking import TrackingError

        sweep_id = Path(str(config.hydra.sweep.dir)).name
        try:
            tracker = _tracker(config)
            existing = tracker.parent_run(sweep_id)
            if existing is not None:
                self.parent_run_id = existing.info.run_id
                return
            tags = environment_tags() | {"sweep_id": sweep_id, "sweep.role": "parent",
                                         "overrides": " ".join(config.hydra.overrides.task),
                                         "sweep_dir": str(Path(str(config.hydra.sweep.dir)).resolve())}
            self.parent_run_id = tracker.start_run(f"sweep-{sweep_id}", tags)
        except TrackingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        log.info("sweep %s: MLflow parent run %s in %s", sweep_id, self.parent_run_id, tracker.uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_id = sweep_dir.name
        outcomes = read_outcomes(sweep_dir)
        table = summary_table(outcomes)
        print(table, flush=True)
        (sweep_dir / "summary.txt").write_text(table + "\n")
        failed = sum(o["status"] == "failed" for o in outcomes)
        if config.mlflow.enabled and self.parent_run_id:
            try:
                tracker = _tracker(config)
                tracker.log(self.parent_run_id, tags={
                    "jobs_done": sum(o["status"] == "done" for o in outcomes),
                    "jobs_skipped": sum(o["status"] == "skipped" for o in outcomes), "jobs_failed": failed})
                tracker.log_artifacts(self.parent_run_id, [sweep_dir / "summary.txt"])
                tracker.end(self.parent_run_id, "FINISHED")
                if config.report:
                    self._report(config, tracker, sweep_id)
            except Exception as exc:  # noqa: BLE001 - best effort after the jobs ran
                log.error("closing the sweep's MLflow parent run failed: %s", exc)
        if failed:
            print(f"{failed} job(s) failed", file=sys.stderr, flush=True)
            sys.exit(1)

    def _report(self, config: DictConfig, tracker: Any, sweep_id: str) -> None:
        try:
            from sweep.report import build_report

            out_root = Path(config.paths.outputs) / "reports"
            path = build_report(tracker.uri, config.mlflow.experiment, out_root=out_root,
                                parent_run_id=self.parent_run_id)
            log.info("report: %s", path)
        except Exception as exc:  # noqa: BLE001 - a report failure never hides the sweep's result
            log.warning("report for sweep %s failed: %s", sweep_id, exc)
