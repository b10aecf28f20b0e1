"""Hydra callback for multiruns: the sweep's MLflow parent run, the summary, the report.

- ``on_multirun_start``: checks the tracking store is reachable (a clear error before any
  evaluation) and creates the parent run tagged with the sweep id (the sweep dir's name).
  Jobs, in this process or in launcher workers, find it by that tag.
  Before that it closes the runs orphaned by dead processes of this host (earlier sweeps
  killed with ``kill -9``, out of memory, or cut off from their tracking server).
- ``on_multirun_end``: reads each job's ``outcome.json`` from the sweep dir, prints the
  done / skipped / failed table, closes the parent run, builds the report (best effort:
  a report failure is logged, never hides the sweep's own result), and exits non-zero
  when any job failed.
- When the launcher itself raises (a joblib worker or submitit job killed by a signal or the
  OOM killer), Hydra never calls ``on_multirun_end``; an ``atexit`` hook then prints the
  table (the dead jobs as ``failed``) and ends the sweep's runs that nobody can close any
  more FAILED, so nothing stays RUNNING. Running the command again resumes the sweep.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sweep import contract
from sweep.budget import answer as budget_answer
from sweep.budget.plan import combinations, expand, preflight_overrides
from sweep.budget.search import BudgetSearch
from sweep.config.resolve import (check_inputs, check_values, check_writable, inputs_key, resolve_budget,
                                  resolve_tracking)
from sweep.config.schema import ConfigError
from sweep.contract import Outcome
from sweep.job import USER_ERRORS
from sweep.memo import process_memo
from sweep.track.spool import EXIT_PENDING, RunRecord, RunSink, pending, pending_message, upload_pending
from sweep.track.tracker import Tracker, TrackingError, environment_tags

log = logging.getLogger(__name__)


def _tracker(config: DictConfig, retry_window: float | None = None) -> Tracker:
    return Tracker.from_spec(resolve_tracking(config), retry_window=retry_window)


# seconds the sweep's own start and end wait for the store (each job waits its full mlflow.retry_window):
# at the start nothing is lost by failing (fix the URI, run again); at the end the records are already safe
SWEEP_EDGE_WINDOW = 10.0


REASON_CHARS = 160  # a failure reason in the summary table; the job's own log line has all of it
LOST = "lost: its process ended without an outcome (killed by a signal or the out-of-memory killer?)"


def _job_name(job_dir: Path) -> str:
    """The run name of a job from the config Hydra saved in its folder."""
    try:
        c = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
        return contract.run_name(str(c.model.name), str(c.prune.method), bool(c.prune.fused), str(c.recover.method),
                                 float(c.sparsity))
    except Exception:  # noqa: BLE001 - a name for the table only
        return f"job {job_dir.name}"


def read_outcomes(sweep_dir: Path) -> list[Outcome]:
    """Outcomes of the jobs of one sweep, in job order. A job that started (Hydra wrote its
    ``.hydra/``) but left no ``outcome.json`` is reported ``failed`` with the reason ``LOST``."""
    out = []
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir()] if sweep_dir.is_dir() else []
    for job in sorted(jobs, key=lambda p: (len(p.name), p.name)):  # 0, 1, ..., 10 (subdir is the job number)
        try:
            o = Outcome.load(job)
        except (OSError, ValueError):
            if not (job / ".hydra").is_dir():
                continue
            o = Outcome("failed", _job_name(job), reason=LOST, job=job.name)
        out.append(o)
    return out


def summary_table(outcomes: list[Outcome]) -> str:
    lines = [f"{'job':>4}  {'status':<8} {'run':<44} {'mAP50-95':>8} {'AR100':>6}  reason"]
    for o in outcomes:
        m = o.metrics
        ap = f"{m['mAP50-95']:.4f}" if "mAP50-95" in m else "-"
        ar = f"{m['AR100']:.3f}" if "AR100" in m else "-"
        reason = o.reason if len(o.reason) <= REASON_CHARS else o.reason[:REASON_CHARS - 1] + "…"  # full text: job log
        lines.append(f"{o.job:>4}  {o.status:<8} {o.name:<44} {ap:>8} {ar:>6}  {reason}")
    c = _counts(outcomes)
    pending = f" ({c['jobs_pending']} with its MLflow record pending upload)" if c["jobs_pending"] else ""
    lines.append(f"sweep: {c['jobs_done']} done, {c['jobs_skipped']} skipped, {c['jobs_failed']} failed{pending}")
    return "\n".join(lines)


def _counts(outcomes: list[Outcome]) -> dict[str, int]:
    counts = {f"jobs_{s}": sum(o.status == s for o in outcomes) for s in contract.STATUSES}
    return counts | {"jobs_pending": sum(o.pending for o in outcomes)}


def _summarize(sweep_dir: Path) -> list[Outcome]:
    """Print the sweep's done / skipped / failed table and save it as ``summary.txt``; the outcomes."""
    outcomes = read_outcomes(sweep_dir)
    table = summary_table(outcomes)
    print(table, flush=True)
    sweep_dir.mkdir(parents=True, exist_ok=True)  # a launcher can fail before any job made it
    (sweep_dir / "summary.txt").write_text(table + "\n")
    return outcomes


def _budget_answer(sweep_dir: Path) -> tuple[dict[str, float], dict[str, str]] | None:
    """A budget search's answer: print its table (after the jobs' table); its parent-run metrics and tags."""
    found = budget_answer.read(sweep_dir)
    if found is None:
        return None
    settings, rounds, rows = found
    print(budget_answer.table(settings, rounds, rows), flush=True)
    return budget_answer.parent_run_record(settings, rows)


def sweep_overrides(config: DictConfig) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper expands them (``hydra.sweeper.params``, then the command
    line; comma lists and ranges become the grid), in job order."""
    return expand(config.hydra.sweeper.get("params"), list(config.hydra.overrides.task), _parser())


def _parser() -> OverridesParser:
    """Hydra's override parser with the config loader (``glob(...)`` over a config group needs it)."""
    return OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())


def sweep_signature(config: DictConfig) -> str:
    """What makes two launches "the same sweep": the experiment, the sweeper and its parameters, and the
    command line's overrides (order-free). Launcher, sweep dir and other ``hydra.*`` settings do not count,
    so a sweep interrupted under one launcher can be continued under another."""
    choices = config.hydra.runtime.choices
    params = config.hydra.sweeper.get("params") or {}
    payload = {"experiment": str(config.mlflow.experiment), "sweeper": str(choices.get("hydra/sweeper", "")),
               "params": {str(k): str(v) for k, v in params.items()},
               "overrides": sorted(str(o) for o in config.hydra.overrides.task)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def is_budget_search(config: DictConfig) -> bool:
    """Whether the sweep runs the budget sweeper (``hydra/sweeper=budget``) instead of a grid."""
    return config.hydra.sweeper.get("_target_") == contract.BUDGET_SWEEPER


def check_budget(config: DictConfig) -> dict[str, list[int]]:
    """The budget search's input errors as {message: [combination numbers]}: the ``budget`` values, sparsity
    given (it is searched), and every combination at sparsity 0 and at the highest searched point, and
    every dense reference (sparsity 0 without recovery), checked as jobs are."""
    try:
        spec = resolve_budget(config)
        combos = combinations(config.hydra.sweeper.get("params"), list(config.hydra.overrides.task), _parser())
    except ConfigError as exc:
        return {str(exc): []}
    search = BudgetSearch(spec.keep, spec.tol, spec.hi)
    loader = GlobalHydra.instance().config_loader()
    problems: dict[str, list[int]] = {}
    inputs = _InputFiles()
    for combo, dense, overrides in preflight_overrides(combos, search.sparsity(search.top)):
        try:
            cfg = loader.load_sweep_config(config, overrides)
            check_values(cfg)
            inputs.check(cfg)
            if dense and cfg.recover.method != "none":
                raise ConfigError(f"recover.method={cfg.recover.method!r} is set by the config even with recover=none")
        except ConfigError as exc:
            message = str(exc)
            if dense and message not in problems:  # an error only the dense reference has
                message = (f"budget search: no dense point possible for combination {combo} "
                           f"({' '.join(overrides)}): {message}; allowed is a search whose dense reference "
                           "(sparsity 0, recover=none) is a valid job")
            if combo not in problems.setdefault(message, []):
                problems[message].append(combo)
    return problems


def check_sweep(config: DictConfig) -> dict[str, list[int]]:
    """The input errors of every job of the sweep, as {message: [job numbers]} (a budget search: {message:
    [combination numbers]}, see :func:`check_budget`): each job's values, then the input files (weights,
    dataset: downloaded now if missing) once per distinct model and dataset, so an offline sweep says what is
    missing once, before its parent run, instead of failing every job."""
    if is_budget_search(config):
        return check_budget(config)
    loader = GlobalHydra.instance().config_loader()
    problems: dict[str, list[int]] = {}
    inputs = _InputFiles()
    for num, overrides in enumerate(sweep_overrides(config)):
        try:
            job = loader.load_sweep_config(config, overrides)
            check_values(job)
            inputs.check(job)
        except ConfigError as exc:
            problems.setdefault(str(exc), []).append(num)
    return problems


class _InputFiles:
    """The input-file check of a sweep's jobs, once per distinct (model, data, cache)."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}  # inputs key -> "" (fine) or the error
        self.memo = process_memo()  # the jobs of this process reuse what the pre-flight opened

    def check(self, job: DictConfig) -> None:
        key = inputs_key(job)
        if key not in self.seen:
            try:
                check_inputs(job, self.memo)
                self.seen[key] = ""
            except USER_ERRORS as exc:
                self.seen[key] = str(exc)
        if self.seen[key]:
            raise ConfigError(self.seen[key])


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        self._open: DictConfig | None = None  # the sweep's config until on_multirun_end ran

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A single run: Hydra creates its output folder right after this; an unwritable one is one message."""
        try:
            check_writable(config)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problems = check_sweep(config)
        if not problems:
            try:
                check_writable(config)
            except ConfigError as exc:
                problems = {str(exc): []}
        if problems:  # before the parent run exists: nothing to clean up, one message per distinct error
            what = "combinations" if is_budget_search(config) else "jobs"
            for message, jobs in problems.items():
                print(f"error: {message}" + (f" ({what} {', '.join(map(str, jobs))})" if len(jobs) > 1 else ""),
                      file=sys.stderr)
            sys.exit(2)
        self._start(config)
        self._open = config
        atexit.register(self._abandoned)
        # Jobs that run in this process (the sequential launcher) leave their completion to after the next
        # point's forward pass, so a point's COCO evaluation overlaps the next point; worker processes of the
        # other launchers never see this flag and complete each job before returning it.
        process_memo().defer_completion = True

    def _start(self, config: DictConfig) -> None:
        if not config.mlflow.enabled:
            return
        sweep_id = Path(str(config.hydra.sweep.dir)).name
        try:
            tracker = _tracker(config, retry_window=SWEEP_EDGE_WINDOW)
            uploaded, left = upload_pending(tracker, resolve_tracking(config).spool)  # records of earlier outages
            if uploaded or left:
                log.info("spool: %d earlier run record(s) uploaded, %d still pending", uploaded, left)
            tracker.close_orphans()  # runs earlier sweeps' dead processes left RUNNING
            existing = tracker.parent_run(sweep_id)  # the same launch again (a requeued Slurm job)
            if existing is not None:
                self.parent_run_id = existing.info.run_id
                return
            signature = sweep_signature(config)
            this_process = environment_tags()
            interrupted = tracker.interrupted_sweep(signature) if config.resume else None
            if interrupted is not None:
                self.parent_run_id = interrupted.info.run_id
                tracker.reopen(self.parent_run_id, {contract.continued_tag(sweep_id): "true",
                                                    contract.TAG_HOST: this_process[contract.TAG_HOST],
                                                    contract.TAG_PID: this_process[contract.TAG_PID]})
                log.info("sweep %s continues the interrupted sweep %s (parent run %s, it ended %s): same command; "
                         "its finished points are reused", sweep_id, interrupted.data.tags.get(contract.TAG_SWEEP_ID),
                         self.parent_run_id, interrupted.info.status)
                return
            tags = this_process | {
                contract.TAG_SWEEP_ID: sweep_id, contract.TAG_ROLE: contract.ROLE_PARENT,
                contract.TAG_SIGNATURE: signature,
                contract.TAG_OVERRIDES: " ".join(contract.redact(o) for o in config.hydra.overrides.task),
                contract.TAG_SWEEP_DIR: str(Path(str(config.hydra.sweep.dir)).resolve())}
            self.parent_run_id = tracker.start_run(f"sweep-{sweep_id}", tags)
        except (TrackingError, ConfigError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except Exception as exc:  # noqa: BLE001 - Hydra would only warn and run the sweep untracked
            print(f"error: the MLflow store {contract.redact(resolve_tracking(config).uri)} failed at sweep start "
                  f"({type(exc).__name__}: {exc}); no job was run", file=sys.stderr)
            sys.exit(2)
        log.info("sweep %s: MLflow parent run %s in %s", sweep_id, self.parent_run_id, contract.redact(tracker.uri))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        memo = process_memo()
        memo.complete_deferred()  # the last point(s) of this process
        memo.defer_completion = False
        self._open = None
        atexit.unregister(self._abandoned)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        outcomes = _summarize(sweep_dir)
        budget = _budget_answer(sweep_dir) if is_budget_search(config) else None  # not a reused dir's old one
        failed = sum(o.status == "failed" for o in outcomes)
        left = 0
        if config.mlflow.enabled and self.parent_run_id:
            left = self._close_parent(config, sweep_dir, outcomes, failed, budget)
        if failed:
            print(f"{failed} job(s) failed", file=sys.stderr, flush=True)
        if left:
            print(pending_message(left, resolve_tracking(config)), file=sys.stderr, flush=True)
        if failed or left:
            sys.exit(1 if failed else EXIT_PENDING)

    def _close_parent(self, config: DictConfig, sweep_dir: Path, outcomes: list[Outcome], failed: int,
                      budget: tuple[dict, dict] | None = None) -> int:
        """Upload what the jobs spooled, end the parent run (or spool its end too), build the report.
        Returns how many records are still pending upload."""
        spec = resolve_tracking(config)
        tracker = None
        try:
            tracker = _tracker(config, retry_window=SWEEP_EDGE_WINDOW)
            upload_pending(tracker, spec.spool)
        except TrackingError as exc:
            log.warning("the MLflow store did not answer at the end of the sweep: %s", exc)
            tracker = None
        record = RunRecord.of(spec, f"sweep-{sweep_dir.name}", role=contract.ROLE_PARENT, run_id=self.parent_run_id,
                              sweep_id=sweep_dir.name)
        sink = RunSink(tracker, spec.spool, record)
        tags: dict[str, Any] = dict(_counts(outcomes))
        if failed:  # the runs table must not show a sweep with failed jobs as a success
            tags[contract.TAG_ERROR] = f"{failed} of {len(outcomes)} job(s) failed"
        try:
            sink.log(tags=tags)
            sink.log_artifacts([sweep_dir / "summary.txt"])
            if budget is not None:  # the budget search's answer
                sink.log(metrics=budget[0], tags=budget[1])
                sink.log_artifacts([sweep_dir / contract.BUDGET_JSON, sweep_dir / contract.BUDGET_CSV])
            spooled = sink.end("FAILED" if failed else "FINISHED")
        except Exception as exc:  # noqa: BLE001 - best effort after the jobs ran
            log.error("closing the sweep's MLflow parent run failed: %s", exc)
            return 0
        left = len(pending(spec.spool, record.store)) if spec.spool else 0
        if spooled:
            log.warning("report for sweep %s not built: its runs wait for the store; after the upload: "
                        "python -m sweep.report --sweep %s", sweep_dir.name, sweep_dir.name)
        elif config.report and not left:
            self._report(config, sink.tracker, sweep_dir.name)
        return left

    def _abandoned(self) -> None:
        """atexit: the launcher raised, so ``on_multirun_end`` never ran (see the module doc)."""
        config, self._open = self._open, None
        if config is None:
            return
        try:
            process_memo().complete_deferred()  # jobs of this process whose COCO numbers were still coming
        except Exception as exc:  # noqa: BLE001 - exiting anyway
            log.error("earlier jobs not completed: %s", exc)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        outcomes = _summarize(sweep_dir)
        print("sweep aborted: it stopped before every job reported (interrupted, or a worker process was killed: "
              "see above); run the same command again to finish it (resume skips the finished points)",
              file=sys.stderr, flush=True)
        if not (config.mlflow.enabled and self.parent_run_id):
            return
        try:
            tracker = _tracker(config)
            if tracker.client.get_run(self.parent_run_id).info.status == "RUNNING":  # Ctrl-C marked it KILLED
                tracker.log(self.parent_run_id, tags=_counts(outcomes))
                tracker.fail(self.parent_run_id, "aborted: the launcher stopped before every job reported")
            closed = tracker.close_orphans(f"tags.{contract.TAG_SWEEP_ID} = '{sweep_dir.name}'",
                                           this_process_ended=True)
            status = tracker.client.get_run(self.parent_run_id).info.status  # KILLED after Ctrl-C, else FAILED
            log.info("sweep %s aborted: parent run %s, %d job run(s) left RUNNING by dead processes ended FAILED",
                     sweep_dir.name, status, len(closed))
        except Exception as exc:  # noqa: BLE001 - we are exiting anyway
            log.error("could not close the aborted sweep's MLflow runs: %s", exc)

    def _report(self, config: DictConfig, tracker: Any, sweep_id: str) -> None:
        try:
            out_root = Path(config.paths.outputs) / "reports"
            from sweep.report import build_report  # lazy: matplotlib & co. cost ~1.3 s of start-up, only for a report

            path = build_report(tracker.uri, config.mlflow.experiment, out_root=out_root,
                                parent_run_id=self.parent_run_id)
            log.info("report: %s", path)
        except Exception as exc:  # noqa: BLE001 - a report failure never hides the sweep's result
            log.warning("report for sweep %s failed: %s", sweep_id, exc)
