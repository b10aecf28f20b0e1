"""The budget sweeper's work: plan the combinations, run the search's rounds through the launcher (one
``launch`` per round, job numbers increasing across rounds), read each job's outcome, write the answer."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from omegaconf import DictConfig, OmegaConf

from sweep import contract
from sweep.budget import answer
from sweep.budget.plan import Combination, combinations, dense_groups
from sweep.budget.search import BudgetSearch, Probe, Result, run_rounds
from sweep.config.resolve import resolve_budget
from sweep.config.spec import BudgetSpec
from sweep.contract import Outcome

log = logging.getLogger(__name__)


def launcher_parallelism(config: DictConfig) -> int:
    """Jobs the launcher runs at once: joblib's ``n_jobs`` (-1: every core, -2: all but one, ...), submitit's
    ``array_parallelism``, else 1 (the sequential launcher)."""
    launcher = config.hydra.launcher
    n_jobs = launcher.get("n_jobs")
    if isinstance(n_jobs, int):
        return max(1, n_jobs if n_jobs > 0 else (os.cpu_count() or 1) + 1 + n_jobs)
    parallel = launcher.get("array_parallelism")
    return max(1, int(parallel)) if isinstance(parallel, int) else 1


def point_result(ret: JobReturn, metric: str) -> Result:
    """A job's ``metric`` from the ``outcome.json`` it wrote (done, or skipped by resume with the stored run's
    numbers); None with the reason when it failed."""
    _ = ret.return_value  # a task that raised stops the sweep, as with the basic sweeper
    out_dir = Path(str(ret.hydra_cfg.hydra.runtime.output_dir)) if ret.hydra_cfg is not None else None
    try:
        outcome = Outcome.load(out_dir) if out_dir is not None else None
    except (OSError, ValueError):
        outcome = None
    if outcome is None:
        return Result(None, f"no {contract.OUTCOME_FILE} in {out_dir}")
    if outcome.status == "failed":
        return Result(None, outcome.reason)
    value = outcome.metrics.get(metric)
    return Result(float(value), "") if isinstance(value, (int, float)) else Result(None, f"{metric} missing")


def _describe(sweeper: Any, combo: Combination) -> tuple[str, str, bool, str]:
    """(model, method, fused, recovery) of a combination, from its composed config."""
    c = sweeper.hydra_context.config_loader.load_sweep_config(sweeper.config, combo.point(0.0))
    return str(c.model.name), str(c.prune.method), bool(c.prune.fused), str(c.recover.method)


def _rows(sweeper: Any, combos: Sequence[Combination], spec: BudgetSpec,
          searches: dict[int, BudgetSearch]) -> list[answer.BudgetRow]:
    described = [_describe(sweeper, c) for c in combos]
    labels = answer.unique_labels([contract.budget_label(*d) for d in described])
    return [answer.BudgetRow.of(labels[c.index], *d, " ".join(c.overrides), spec.metric, spec.keep,
                                searches[c.index].answer()) for c, d in zip(combos, described)]


def run_search(sweeper: Any, arguments: list[str]) -> list[Sequence[JobReturn]]:
    config: DictConfig = sweeper.config
    spec = resolve_budget(config)
    parser = OverridesParser.create(config_loader=sweeper.hydra_context.config_loader)
    combos = combinations(sweeper.params, arguments, parser)
    groups = dense_groups(combos)
    searches = {c.index: BudgetSearch(spec.keep, spec.tol, spec.hi) for c in combos}
    n = spec.points or launcher_parallelism(config)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")
    log.info("budget search: %d combination(s), %d dense reference(s), %d point(s) per round and bracket",
             len(combos), len(groups), n)

    returns: list[Sequence[JobReturn]] = []

    def overrides(p: Probe) -> list[str]:
        return combos[groups[p.key][0]].dense() if p.dense else combos[p.key].point(p.sparsity)

    def evaluate(probes: list[Probe]) -> list[Result]:
        batch = [overrides(p) for p in probes]
        sweeper.validate_batch_is_legal(batch)
        first = sum(len(r) for r in returns)
        what = [f"combination {groups[p.key][0]} dense" if p.dense else f"combination {p.key} s={p.sparsity:g}"
                for p in probes]
        log.info("budget round %d: jobs %d-%d: %s", len(returns) + 1, first, first + len(batch) - 1, ", ".join(what))
        results = sweeper.launcher.launch(batch, initial_job_idx=first)
        from sweep.memo import process_memo

        process_memo().complete_deferred()  # jobs of this process whose COCO numbers were still coming
        returns.append(results)
        return [point_result(r, spec.metric) for r in results]

    rounds = run_rounds(searches, groups, n, evaluate)
    rows = _rows(sweeper, combos, spec, searches)
    answer.write(sweep_dir, asdict(spec) | {"points": n}, rounds, rows)  # points: the number the search used
    return returns
