"""The budget search's answer: one row per combination, written as ``budget.json`` / ``budget.csv`` into the
sweep dir by the sweeper, read back by the sweep callback (table, parent-run artifacts, tags, metrics)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sweep import contract
from sweep.budget.search import FOUND, Answer


@dataclass(frozen=True)
class BudgetRow:
    """One combination's answer, with what it is (from its composed config) and its overrides."""

    label: str                 # contract.budget_label: e.g. yolov5n-global_l1
    model: str
    method: str
    fused: bool
    recover: str
    overrides: str             # the combination's own overrides, space-separated
    metric: str
    keep: float
    status: str                # search.FOUND | DENSE_FAILED | ERROR | OPEN
    max_sparsity: float | None
    value: float | None        # the metric at max_sparsity
    dense: float | None
    retention: float | None
    bracket_lo: float | None
    bracket_hi: float | None   # the lowest failing point; None: nothing up to budget.hi failed
    points: int
    non_monotone: bool
    note: str

    @classmethod
    def of(cls, label: str, model: str, method: str, fused: bool, recover: str, overrides: str, metric: str,
           keep: float, a: Answer) -> "BudgetRow":
        lo, hi = a.bracket if a.bracket else (None, None)
        return cls(label, model, method, fused, recover, overrides, metric, keep, a.status, a.sparsity, a.value,
                   a.dense, a.retention, lo, hi, a.points, a.non_monotone, a.reason)

    @property
    def bracket(self) -> str:
        if self.bracket_lo is None:
            return "-"
        return f"[{self.bracket_lo:g}, {self.bracket_hi:g})" if self.bracket_hi is not None \
            else f"[{self.bracket_lo:g}, end]"


def unique_labels(labels: list[str]) -> list[str]:
    """Labels made unique: combinations that differ in another axis than model/method/recovery get ``.<n>``
    (their combination number; MLflow keys allow letters, digits, ``_-. /``)."""
    seen: dict[str, int] = {}
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
    return [lab if seen[lab] == 1 else f"{lab}.{i}" for i, lab in enumerate(labels)]


def write(sweep_dir: Path, settings: dict[str, Any], rounds: int, rows: list[BudgetRow]) -> list[Path]:
    """``budget.json`` (settings, rounds, rows) and ``budget.csv`` (rows) in the sweep dir."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    js, cs = sweep_dir / contract.BUDGET_JSON, sweep_dir / contract.BUDGET_CSV
    js.write_text(json.dumps({"budget": settings, "rounds": rounds, "combinations": [asdict(r) for r in rows]},
                             indent=2))
    with cs.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(BudgetRow.__dataclass_fields__))
        w.writeheader()
        w.writerows(asdict(r) for r in rows)
    return [js, cs]


def read(sweep_dir: Path) -> tuple[dict[str, Any], int, list[BudgetRow]] | None:
    """(settings, rounds, rows) of a budget search's sweep dir, None when it has no ``budget.json``."""
    path = sweep_dir / contract.BUDGET_JSON
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    return d["budget"], int(d["rounds"]), [BudgetRow(**r) for r in d["combinations"]]


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _note(r: BudgetRow) -> str:
    parts = [] if r.status == FOUND else [r.status]
    parts += [r.note] if r.note else []
    if r.label != contract.budget_label(r.model, r.method, r.fused, r.recover):  # another axis tells them apart
        parts.append(f"[{r.overrides}]")
    return "; ".join(parts)


def table(settings: dict[str, Any], rounds: int, rows: list[BudgetRow]) -> str:
    """The answer as printed at the end of the sweep."""
    metric = settings["metric"]
    head = (f"budget search: highest sparsity keeping {metric} >= {settings['keep']:g} x dense "
            f"(multiples of {settings['tol']:g} up to {settings['hi']:g}; {rounds} round(s))")
    cols = f"{'model':<10} {'method':<24} {'recovery':<9} {'max sparsity':>12} {metric:>9} {'retention':>9} " \
           f"{'points':>6}  {'bracket':<16} note"
    lines = [head, cols]
    for r in rows:
        method = r.method + ("" if r.fused else " (unfused)")
        lines.append(f"{r.model:<10} {method:<24} {r.recover:<9} {_num(r.max_sparsity, 'g'):>12} "
                     f"{_num(r.value, '.4f'):>9} {_num(r.retention, '.3f'):>9} {r.points:>6}  {r.bracket:<16} "
                     f"{_note(r)}")
    return "\n".join(lines)


def parent_run_record(settings: dict[str, Any], rows: list[BudgetRow]) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) for the sweep's parent run: the settings, and per combination its answer."""
    tags = {f"{contract.BUDGET_TAG_PREFIX}{k}": str(v) for k, v in settings.items()}
    metrics: dict[str, float] = {}
    for r in rows:
        tags[contract.budget_key(contract.BUDGET_STATUS, r.label)] = r.status + (" (non-monotone)" if r.non_monotone
                                                                                   else "")
        tags[contract.budget_key(contract.BUDGET_BRACKET, r.label)] = r.bracket
        metrics[contract.budget_key(contract.BUDGET_POINTS, r.label)] = float(r.points)
        for what, v in ((contract.BUDGET_MAX_SPARSITY, r.max_sparsity), (contract.BUDGET_VALUE, r.value),
                        (contract.BUDGET_RETENTION, r.retention)):
            if v is not None:
                metrics[contract.budget_key(what, r.label)] = float(v)
    return metrics, tags
