"""Run frames -> typed columns, dense references, results.csv and results.md.

Settings that change the numbers themselves — ``data.name``, ``eval.imgsz``, ``eval.half`` — form a
*setting* (label like ``coco-val128 · 640px · FP16``). Runs of different settings are never put on
one curve or compared against each other's dense reference: every figure gets one row of panels per
setting, and the tables carry the setting as a column when it varies. Timing figures further split
by device (``device_name`` tag), since ms/image from two machines are not comparable.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from pathlib import PureWindowsPath
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from sweep import contract
from sweep.contract import parse_run_name

from .common import metric, param, plural

OUTCOME = {"FINISHED": "ok", "FAILED": "failed", "KILLED": "killed",
           "RUNNING": "incomplete", "SCHEDULED": "incomplete"}
_SIZES = "nsmlx"


# ---------------------------------------------------------------- parsing params

def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def parse_list(v: Any) -> tuple[str, ...]:
    """``"[]"`` / ``"['model.3.conv']"`` (a list rendered as string) -> tuple of strings."""
    if _missing(v):
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(str(x) for x in v)
    s = str(v).strip()
    if s in ("", "None", "null", "[]"):
        return ()
    try:
        obj = ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return tuple(p.strip().strip("'\"") for p in s.strip("[]").split(",") if p.strip())
    if isinstance(obj, (list, tuple)):
        return tuple(str(x) for x in obj)
    return (str(obj),)


def parse_bool(v: Any) -> Optional[bool]:
    if _missing(v):
        return None
    s = str(v).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    return None


def parse_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def parse_int(v: Any) -> Optional[int]:
    f = parse_float(v)
    return None if math.isnan(f) else int(round(f))


def model_sort_key(name: str) -> tuple:
    """yolov5n < yolov5s < ... < yolov5x (then P6 variants), unknown names alphabetically after."""
    m = re.match(r"^yolov(\d+)([nsmlx])(\d*)(u?)$", str(name))
    if m:
        return (0, int(m.group(1)), m.group(3) != "", _SIZES.index(m.group(2)), str(name))
    return (1, 0, False, 0, str(name))


def layer_index(pattern: str) -> float:
    """The integer after ``model.`` (network order), inf when the pattern has none."""
    m = re.search(r"model\.(\d+)", pattern)
    return float(m.group(1)) if m else math.inf


def scope_label(include: tuple[str, ...], exclude: tuple[str, ...]) -> str:
    parts = []
    if include:
        parts.append(", ".join(include))
    if exclude:
        parts.append("not " + ", ".join(exclude))
    return " ; ".join(parts) if parts else "all layers"


def model_label(name: Any, weights: Any) -> str:
    """The model's name; a custom checkpoint (``model=custom``) is named by its file: ``custom (best.pt)``."""
    name = "?" if _missing(name) else str(name)
    if name == "custom" and not _missing(weights) and str(weights).strip() not in ("", "None", "???"):
        return f"custom ({PureWindowsPath(str(weights)).name})"  # splits on both / and backslash
    return name


def data_label(name: Any, limit: Any) -> str:
    """The dataset's name; a subset (``data.limit=N``) says so: ``coco-val128 (first 32 images)``."""
    label = "?" if _missing(name) else str(name)
    n = parse_int(limit)
    if n is not None:
        label += f" (first {plural(n, 'image')})"
    return label


def recover_label(method: Any, epochs: Any, iters: Any) -> str:
    """The recovery with its budget: ``none``, ``bn``, ``finetune 3 ep`` or ``finetune 300 it`` (``recover.iters``
    caps the epochs): fine-tunes of different budgets are different points, never merged."""
    method = "none" if _missing(method) else str(method)
    if method != "finetune":
        return method
    n_iters, n_epochs = parse_int(iters), parse_int(epochs)
    if n_iters is not None:
        return f"finetune {n_iters} it"
    return f"finetune {n_epochs if n_epochs is not None else '?'} ep"


def recover_sort_key(label: str) -> tuple:
    """none < bn < finetune budgets by size (iterations as written; epochs after iterations)."""
    m = re.match(r"^finetune (\d+|\?) (it|ep)$", label)
    if m:
        return (2, m.group(2) == "ep", int(m.group(1)) if m.group(1).isdigit() else 0)
    return ({"none": 0, "bn": 1}.get(label, 3), False, 0, label)


def precision_label(half: Optional[bool]) -> str:
    return {True: "FP16", False: "FP32"}.get(half, "auto precision")


# ---------------------------------------------------------------- normalisation

def normalize(raw: pd.DataFrame) -> pd.DataFrame:
    """Add typed columns (model, method, recover, target, setting, outcome, x, ...) to a run frame."""
    df = raw.copy()

    def col(name: str) -> pd.Series:
        return df[name] if name in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)

    names = df["run_name"].fillna("").astype(str).map(parse_run_name)  # the fallback when params are missing
    df["model_name"] = [p if not _missing(p) else (n.model if n else "?")
                        for p, n in zip(col(param("model.name")), names)]
    df["model"] = [model_label(m, w) for m, w in zip(df["model_name"], col(param("model.weights")))]
    df["method"] = [p if not _missing(p) else (n.method if n else "?")
                    for p, n in zip(col(param("prune.method")), names)]
    df["recover_method"] = [str(v) if not _missing(v) else (n.recover if n else "none")
                            for v, n in zip(col(param("recover.method")), names)]
    df["recover"] = [recover_label(m, e, i) for m, e, i in
                     zip(df["recover_method"], col(param("recover.epochs")), col(param("recover.iters")))]
    df["fused"] = [str(v) if not _missing(v) else (str(n.fused) if n else "?")
                   for v, n in zip(col(param("prune.fused")), names)]
    target = [parse_float(p) if not _missing(p) else (n.sparsity if n else float("nan"))
              for p, n in zip(col(param("sparsity")), names)]
    df["target"] = pd.Series(target, index=df.index, dtype=float)
    if metric("sparsity_target") in df.columns:
        df["target"] = df["target"].fillna(df[metric("sparsity_target")])
    df["seed"] = [parse_int(v) for v in col(param("prune.seed"))]  # None: not logged (older runs)
    df["include"] = [parse_list(v) for v in col(param("prune.include"))]
    df["exclude"] = [parse_list(v) for v in col(param("prune.exclude"))]
    df["scope"] = [scope_label(i, e) for i, e in zip(df["include"], df["exclude"])]
    df["data"] = [data_label(v, lim) for v, lim in zip(col(param("data.name")), col(param("data.limit")))]
    df["imgsz"] = [parse_int(v) for v in col(param("eval.imgsz"))]
    df["half"] = [parse_bool(v) for v in col(param("eval.half"))]
    df["precision"] = [precision_label(h) for h in df["half"]]
    dev_name, dev_param = col("tags.device_name"), col(param("eval.device"))
    df["device"] = [str(a) if not _missing(a) else (str(b) if not _missing(b) else "?")
                    for a, b in zip(dev_name, dev_param)]
    df["setting"] = [f"{d} · {i if i is not None else '?'}px · {p}"
                     for d, i, p in zip(df["data"], df["imgsz"], df["precision"])]
    df["timing_setting"] = [f"{s} · {d}" for s, d in zip(df["setting"], df["device"])]
    df["outcome"] = [OUTCOME.get(str(s), str(s).lower()) for s in df["status"]]
    if metric("mAP50-95") in df.columns:
        no_metrics = (df["outcome"] == "ok") & df[metric("mAP50-95")].isna()
    else:
        no_metrics = df["outcome"] == "ok"
    df.loc[no_metrics, "outcome"] = "no metrics"
    df["error"] = col("tags.error")
    measured = df[metric("sparsity")] if metric("sparsity") in df.columns else pd.Series(np.nan, index=df.index)
    df["x_measured"] = measured.notna()
    df["x"] = measured.fillna(df["target"]) * 100.0
    df["is_dense"] = df["target"].fillna(-1.0) == 0.0
    df["model_key"] = df["model"].map(model_sort_key)
    df["recover_key"] = [recover_sort_key(r) for r in df["recover"]]
    df = df.sort_values(["setting", "model_key", "method", "recover_key", "scope", "target", "start_time"],
                        kind="stable").reset_index(drop=True)
    return df


def ok_runs(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["outcome"] == "ok"]


POINT_KEY = ["setting", "model", "method", "recover", "fused", "scope", "target"]


def dedupe(df: pd.DataFrame, by_device: bool = False) -> pd.DataFrame:
    """One finished run per configuration point and ``prune.seed`` (the most recent), for plotting; runs of
    several seeds are then combined by :func:`aggregate_seeds`."""
    key = POINT_KEY + ["seed"] + (["device"] if by_device else [])
    d = ok_runs(df).sort_values("start_time", ascending=False, kind="stable")
    return d.drop_duplicates(key, keep="first").sort_index()


SEED_MIN, SEED_MAX = "seedmin.", "seedmax."  # prefixes of a column's smallest / largest value over the seeds
_AVERAGED = ("metrics.", "retention.", "delta.", "dense.")


def aggregate_seeds(points: pd.DataFrame, by_device: bool = False) -> pd.DataFrame:
    """One row per configuration point: runs that differ only by ``prune.seed`` (de-duplicated, one per seed)
    become their mean, with ``seedmin.<col>`` / ``seedmax.<col>`` (the spread shown: min-max over the seeds,
    honest for 2-5 seeds where a standard deviation says little), ``n_seeds`` and ``seeds``.

    Every numeric metric, retention and delta column is averaged (bootstrap bounds too: the mean interval of
    one run); ``x`` (measured sparsity) likewise. A point of one seed keeps its run, ``n_seeds`` 1.
    """
    if points.empty:
        return points.assign(n_seeds=pd.Series(dtype=int), seeds="")
    key = POINT_KEY + (["device"] if by_device else [])
    cols = [c for c in points.columns if c.startswith(_AVERAGED) and pd.api.types.is_numeric_dtype(points[c])]
    rows = []
    for _, g in points.groupby(key, sort=False, dropna=False):
        row = g.iloc[0].copy()
        seeds = sorted({int(s) for s in g["seed"] if not _missing(s)})
        row["n_seeds"] = len(g)
        row["seeds"] = ", ".join(map(str, seeds))
        if len(g) > 1:
            for c in cols:
                row[c] = g[c].mean()
                row[SEED_MIN + c], row[SEED_MAX + c] = g[c].min(), g[c].max()
            row["x"] = g["x"].mean()
            row["run_id"] = ",".join(g["run_id"])
        rows.append(row)
    return pd.DataFrame(rows).sort_index()


def seed_table(points: pd.DataFrame, names: Iterable[str] = ("mAP50-95", "mAP50", "AR100")) -> pd.DataFrame:
    """The points aggregated over several seeds (:func:`aggregate_seeds`) as strings: mean (min–max) per metric."""
    multi = points[points.get("n_seeds", pd.Series(1, index=points.index)) > 1] if len(points) else points
    rows = []
    for _, r in multi.iterrows():
        row = {"model": r["model"], "method": r["method"], "recover": r["recover"], "setting": r["setting"],
               "target": contract.sparsity_label(r["target"]), "seeds": f"{int(r['n_seeds'])} ({r['seeds']})"}
        for n in names:
            c = metric(n)
            row[n] = (f"{r[c]:.3f} ({r[SEED_MIN + c]:.3f}–{r[SEED_MAX + c]:.3f})"
                      if c in r.index and not _missing(r[c]) and SEED_MIN + c in r.index else "—")
        rows.append(row)
    table = pd.DataFrame(rows, columns=["model", "method", "recover", "setting", "target", "seeds", *names])
    for c in ("recover", "setting"):
        if table[c].nunique(dropna=False) <= 1:
            table = table.drop(columns=c)
    return table


# ---------------------------------------------------------------- dense references

@dataclass
class DenseRef:
    """The dense (target 0) values of one (model, setting) key of ``dense_refs``."""

    values: dict[str, float]         # metric name -> value (mean over the dense runs)
    x: float                         # measured sparsity (%) of the dense model
    run_ids: list[str] = field(default_factory=list)
    outside: bool = False            # taken from a run outside the selection

    def get(self, name: str) -> float:
        return self.values.get(name, float("nan"))


def dense_refs(df: pd.DataFrame, group: str = "setting",
               extra: Optional[pd.DataFrame] = None) -> dict[tuple[str, str], DenseRef]:
    """(model, group label) -> dense reference, from the finished target-0 runs.

    Runs without recovery and pruning every layer are preferred when several kinds exist.
    ``extra`` (finished runs from outside the selection) only fills keys the selection lacks,
    with its most recent run.
    """
    out: dict[tuple[str, str], DenseRef] = {}
    ok = ok_runs(df)
    wanted = set(zip(ok["model"], ok[group]))

    def build(frame: pd.DataFrame, outside: bool) -> None:
        d = ok_runs(frame)
        d = d[d["is_dense"]]
        for (model, g), runs in d.groupby(["model", group], sort=False):
            if (model, g) in out or (outside and (model, g) not in wanted):
                continue
            pref = runs[runs["recover"] == "none"]
            runs = pref if len(pref) else runs
            if outside:
                runs = runs.sort_values("start_time", ascending=False).head(1)
            values = {c[len("metrics."):]: float(runs[c].mean()) for c in runs.columns
                      if c.startswith("metrics.") and runs[c].notna().any()}
            out[(model, g)] = DenseRef(values, float(runs["x"].mean()), list(runs["run_id"]), outside)

    build(df, False)
    if extra is not None and len(extra):
        build(extra, True)
    return out


def add_dense_columns(df: pd.DataFrame, refs: dict[tuple[str, str], DenseRef],
                      names: Iterable[str] = ("mAP50-95", "mAP50", "AR100")) -> pd.DataFrame:
    """``dense.<m>``, ``delta.<m>`` (run - dense) and ``retention.<m>`` (% of dense) columns."""
    df = df.copy()
    for n in names:
        dense = [refs[(m, s)].get(n) if (m, s) in refs else np.nan for m, s in zip(df["model"], df["setting"])]
        df[f"dense.{n}"] = pd.Series(dense, index=df.index, dtype=float)
        val = df[metric(n)] if metric(n) in df.columns else pd.Series(np.nan, index=df.index)
        df[f"delta.{n}"] = val - df[f"dense.{n}"]
        with np.errstate(divide="ignore", invalid="ignore"):
            df[f"retention.{n}"] = np.where(df[f"dense.{n}"] > 0, 100.0 * val / df[f"dense.{n}"], np.nan)
    return df


# ---------------------------------------------------------------- cross-size Pareto: best run under a budget

# the absolute cost axes a budget is read on: (metric, what, scale, unit)
BUDGET_COSTS = (("params_nonzero", "non-zero parameters", 1e-6, " M"), ("gflops", "GFLOPs", 1.0, ""),
                (contract.LATENCY_B1, "batch-1 latency", 1.0, " ms"),
                ("size_mb_compressed", "compressed size (zstd)", 1.0, " MB"))
BUDGET_COLUMNS = ["setting", "cost", "budget: a dense run", "best run within it", "its cost", "mAP50-95",
                  "dense mAP50-95", "gain"]


def point_label(r: pd.Series) -> str:
    """``yolov5m·l1_unstructured·0.30`` (``·bn`` when recovered, ``·3 seeds`` for a mean over seeds)."""
    label = f"{r['model']}·{r['method']}·{contract.sparsity_label(r['target'])}"
    if r.get("recover", "none") != "none":
        label += f"·{r['recover']}"
    n = r.get("n_seeds", 1)
    if not _missing(n) and n > 1:
        label += f"·{int(n)} seeds"
    return label


def budget_table(points: pd.DataFrame, value: str = "mAP50-95", group: str = "timing_setting") -> pd.DataFrame:
    """For each cost axis and each model's dense run: the most accurate run of any model whose cost is at most
    that dense run's (ties: the cheaper) — "is pruned yolov5m better than dense yolov5s at its cost?".

    ``points``: finished, de-duplicated (seed-aggregated) runs of every model; runs are compared only within
    one ``group`` (the timing setting: same data, image size, precision and device). Strings, one row per
    (group, cost, dense run); the group column is dropped when there is one.
    """
    v = metric(value)
    rows = []
    if points.empty or v not in points.columns:
        return pd.DataFrame(columns=BUDGET_COLUMNS)
    for g, sub in points.groupby(group, sort=True):
        dense = sub[sub["is_dense"] & sub[v].notna()].sort_values("model_key", kind="stable")
        for name, what, scale, unit in BUDGET_COSTS:
            c = metric(name)
            if c not in sub.columns:
                continue
            cand = sub[sub[c].notna() & sub[v].notna()]
            for _, d in dense.iterrows():
                if _missing(d[c]):
                    continue
                under = cand[cand[c] <= d[c] * (1 + 1e-9)]
                best = under.sort_values([v, c], ascending=[False, True], kind="stable").iloc[0]
                rows.append({"setting": g, "cost": what,
                             "budget: a dense run": f"{d['model']}: {d[c] * scale:.4g}{unit}",
                             "best run within it": point_label(best), "its cost": f"{best[c] * scale:.4g}{unit}",
                             "mAP50-95": f"{best[v]:.3f}", "dense mAP50-95": f"{d[v]:.3f}",
                             "gain": f"{best[v] - d[v]:+.3f}"})
    table = pd.DataFrame(rows, columns=BUDGET_COLUMNS)
    if table["setting"].nunique() <= 1:
        table = table.drop(columns="setting")
    return table


# ---------------------------------------------------------------- results.csv

def results_csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """All params, metrics and tags of every run (failed ones included), plus ``report.*`` columns."""
    raw = [c for c in df.columns if c in ("run_id", "run_name", "status", "start_time", "end_time",
                                          "parent_run_id")
           or c.startswith(("params.", "metrics.", "tags."))]
    out = df[raw].copy()
    out.insert(3, "report.outcome", df["outcome"])
    out["report.setting"] = df["setting"]
    out["report.measured_sparsity_pct"] = df["x"].where(df["x_measured"])
    for c in ("dense.mAP50-95", "delta.mAP50-95", "retention.mAP50-95"):
        if c in df.columns:
            out[f"report.{c}"] = df[c]
    return out


# ---------------------------------------------------------------- results.md / summary table

SUMMARY_COLUMNS = ["model", "method", "recover", "setting", "scope", "target", "seed", "measured", "mAP50-95",
                   "Δ vs dense", "mAP50", "AR100", "ms/image", "GFLOPs", "status"]


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return format(v, spec)


def _get(row: pd.Series, name: str) -> float:
    v = row.get(metric(name), np.nan)
    return float(v) if not _missing(v) else float("nan")


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """The results.md table as strings, one row per run; constant columns (recover, setting, scope)
    are dropped when they do not vary."""
    rows = []
    for _, r in df.iterrows():
        ok = r["outcome"] == "ok"
        delta = r.get("delta.mAP50-95", np.nan)
        dense = r.get("dense.mAP50-95", np.nan)
        if ok and not _missing(delta) and not _missing(dense) and dense > 0:
            d = f"{delta:+.3f} ({100 * delta / dense:+.1f}%)"
        else:
            d = "—"
        if r["outcome"] == "ok":
            status = "ok"
        else:
            err = r.get("error")
            status = r["outcome"].upper() if r["outcome"] in ("failed", "killed") else r["outcome"]
            status = f"{status} (missing)"
            if not _missing(err) and str(err):
                e = " ".join(str(err).split())
                status += f": {e[:80]}{'…' if len(e) > 80 else ''}"
        measured = _get(r, "sparsity")
        rows.append({
            "model": r["model"], "method": r["method"], "recover": r["recover"], "setting": r["setting"],
            "scope": r["scope"],
            "target": contract.sparsity_label(r["target"]) if not _missing(r["target"]) else "—",
            "seed": "—" if _missing(r.get("seed")) else str(int(r["seed"])),
            "measured": _fmt(measured, ".3f") if ok else "—",
            "mAP50-95": _fmt(_get(r, "mAP50-95"), ".3f") if ok else "—",
            "Δ vs dense": d,
            "mAP50": _fmt(_get(r, "mAP50"), ".3f") if ok else "—",
            "AR100": _fmt(_get(r, "AR100"), ".3f") if ok else "—",
            "ms/image": _fmt(_get(r, "ms_inference"), ".2f") if ok else "—",
            "GFLOPs": _fmt(_get(r, "gflops"), ".2f") if ok else "—",
            "status": status,
        })
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    for c in ("recover", "setting", "scope"):
        if c in df.columns and df[c].nunique(dropna=False) <= 1:
            table = table.drop(columns=c)
    if "seed" not in df.columns or df.loc[~df["is_dense"], "seed"].nunique() <= 1:  # dense runs ignore the seed
        table = table.drop(columns="seed")
    return table


def markdown_table(table: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    right = {"target", "measured", "mAP50-95", "Δ vs dense", "mAP50", "AR100", "ms/image", "GFLOPs"}
    lines = ["| " + " | ".join(cell(c) for c in table.columns) + " |",
             "|" + "|".join("---:" if c in right else "---" for c in table.columns) + "|"]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(cell(v) for v in r.tolist()) + " |")
    return "\n".join(lines) + "\n"
