"""build_report: select runs -> frames -> figures, tables, PDF -> files (+ artifacts on the parent run)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Union

import pandas as pd

from sweep import contract

from . import figures as F
from . import pdf as P
from . import query as Q
from . import tables as T
from .common import (ALL, ARTIFACT_DIR, DEFAULT_EXPERIMENT, REPORT_FILES, ReportError,
                     default_out_root, default_tracking_uri, metric, plural)

log = logging.getLogger(__name__)
PNG_DPI = 150


STALE_BUILD_S = 600  # a hidden build folder this old was left by a killed build, not one in progress


def _remove_stale_builds(out_root: Path, name: str) -> None:
    """Hidden build folders of this report left by a build that was killed (a kill skips its cleanup)."""
    now = time.time()
    for stale in out_root.glob(f".{name}.*"):
        if stale.is_dir() and now - stale.stat().st_mtime > STALE_BUILD_S:
            shutil.rmtree(stale, ignore_errors=True)


def _logged(frame: pd.DataFrame, name: str) -> bool:
    """Whether any run of ``frame`` logged the metric ``name``."""
    col = metric(name)
    return col in frame.columns and bool(frame[col].notna().any())


def _safe_name(s: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", str(s)).strip("._") or "sweep"
    return name[:120]


_plural = plural


def _uniq(values) -> list[str]:
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and v != v) or str(v) in ("", "?", "nan", "None"):
            continue
        if str(v) not in out:
            out.append(str(v))
    return out


def _fmt_time(ts) -> str:
    if ts is None or pd.isna(ts):
        return "—"
    return pd.Timestamp(ts).strftime("%Y-%m-%d %H:%M UTC")


def _extra_dense(sel: Q.Selection, df: pd.DataFrame) -> Optional[pd.DataFrame]:
    """Finished dense runs elsewhere in the experiment for (model, setting) pairs the selection lacks."""
    if sel.mode == ALL:
        return None
    ok = T.ok_runs(df)
    have = set(map(tuple, ok[ok["is_dense"]][["model", "setting"]].to_numpy().tolist()))
    want = set(map(tuple, ok[["model", "setting"]].to_numpy().tolist())) - have
    if not want:
        return None
    try:
        names = {n for n, m, s in zip(ok["model_name"], ok["model"], ok["setting"]) if (m, s) in want}
        runs = Q.find_dense_runs(sel, sorted(names))  # by params.model.name; labels are matched below
    except Exception as e:  # a best-effort lookup: the report stands without it
        log.warning("dense reference lookup failed: %s", e)
        return None
    ids = set(df["run_id"])
    runs = [r for r in runs if r.info.run_id not in ids]
    if not runs:
        return None
    extra = T.ok_runs(T.normalize(Q.runs_frame(runs)))
    extra = extra[extra["is_dense"]]
    keep = [(m, s) in want for m, s in zip(extra["model"], extra["setting"])]
    return extra[keep] if any(keep) else None


def _title_fields(sel: Q.Selection, df: pd.DataFrame, now: datetime) -> list[tuple[str, str]]:
    started = sel.parent.info.start_time if sel.parent is not None else None
    start = (pd.Timestamp(started, unit="ms", tz="UTC") if started else df["start_time"].min())
    n = len(df)
    counts = df["outcome"].value_counts()
    if counts.get("ok", 0) == n:
        runs = f"{n}, all finished" if n > 1 else "1, finished"
    else:
        runs = f"{n}: {counts.get('ok', 0)} finished" + "".join(
            f", {v} {k}" for k, v in counts.items() if k != "ok")
    targets = sorted(t for t in df["target"].dropna().unique())
    commits = _uniq(df.get("tags.git_commit", pd.Series(dtype=object)))
    devices = _uniq(df["device"])
    fields = [
        ("sweep id", sel.sweep_id if sel.mode != ALL else "all finished runs of the experiment"),
        ("experiment", sel.experiment_name),
        ("parent run", sel.parent_run_id or "—"),
        ("sweep date", _fmt_time(start)),
        ("report date", now.strftime("%Y-%m-%d %H:%M UTC")),
        ("models", ", ".join(sorted(_uniq(df["model"]), key=T.model_sort_key)) or "—"),
        ("methods", ", ".join(sorted(_uniq(df["method"]))) or "—"),
        ("recovery", ", ".join(sorted(_uniq(df["recover"]), key=lambda r: (r != "none", r)))),
        ("target sparsity", ", ".join(f"{t:g}" for t in targets) or "—"),
        ("dataset", ", ".join(_uniq(df["data"])) or "—"),
        ("settings", " | ".join(_uniq(df["setting"]))),
        ("device", ", ".join(devices) or "—"),
        ("git commit", ", ".join(c[:12] for c in commits) or "—"),
        ("runs", runs),
        ("tracking URI", sel.tracking_uri),
    ]
    return fields


def _markdown(title: str, fields: list[tuple[str, str]], notes: list[str], table: pd.DataFrame,
              figures: list[str], sections: list[tuple[str, str, pd.DataFrame]] = ()) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in fields if k != "tracking URI"]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Results", "",
              "mAP/AR are COCO numbers in [0, 1]; Δ vs dense is the mAP50-95 difference from the same "
              "model's dense run (same dataset, image size and precision); ms/image is the inference "
              "stage; runs that did not finish are listed with their status and no values.", "",
              T.markdown_table(table)]
    for heading, blurb, extra in sections:
        lines += [f"## {heading}", "", blurb, "", T.markdown_table(extra)]
    lines += ["## Figures", ""]
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def build_report(tracking_uri: Optional[str] = None, experiment: str = DEFAULT_EXPERIMENT,
                 sweep: Optional[str] = None, out_root: Union[Path, str, None] = None,
                 parent_run_id: Optional[str] = None, attach: bool = True) -> Path:
    """Build the report of one sweep and return its folder ``<out_root>/<sweep id>/``.

    Selection: ``parent_run_id``, else ``sweep`` (a sweep id, or ``"all"`` for every finished job
    run of the experiment, written to ``<out_root>/all``), else the most recent sweep (the parent
    run with the latest start time). ``tracking_uri`` None -> $MLFLOW_TRACKING_URI, else
    ``sqlite:///<cwd>/outputs/mlflow.db``; ``out_root`` None -> ``<cwd>/outputs/reports``.
    With ``attach`` the files are logged on the parent run under ``report/`` (when there is one).

    Raises ReportError (nothing written) when the selection is empty or no run finished with metrics.
    """
    tracking_uri = tracking_uri or default_tracking_uri()
    out_root = Path(out_root).absolute() if out_root is not None else default_out_root()
    sel = Q.select_runs(tracking_uri, experiment, sweep=sweep, parent_run_id=parent_run_id)
    what = "experiment " + repr(sel.experiment_name) if sel.mode == ALL else f"sweep {sel.sweep_id!r}"
    if not sel.runs:
        raise ReportError(f"{what} has no job runs (nothing finished yet?); no report written")

    df = T.normalize(Q.runs_frame(sel.runs))
    ok = T.ok_runs(df)
    if ok.empty:
        errors = _uniq(df["error"])
        detail = f"; first error: {errors[0][:200]}" if errors else ""
        status = ", ".join(f"{v} {k}" for k, v in df["outcome"].value_counts().items())
        every = "the only run" if len(df) == 1 else f"all {len(df)} runs"
        raise ReportError(f"{every} of {what} failed or {'has' if len(df) == 1 else 'have'} no metrics "
                          f"({status}){detail}; "
                          f"no report written")

    notes = list(sel.notes)
    extra = _extra_dense(sel, df)
    refs = T.dense_refs(df, "setting", extra)
    refs_time = T.dense_refs(df, "timing_setting", extra)
    for (model, setting), ref in refs.items():
        if ref.outside:
            notes.append(f"no dense run of {model} ({setting}) in this sweep: dense reference taken from "
                         f"run {ref.run_ids[0]} of the same experiment")
    missing = sorted({(m, s) for m, s in zip(ok["model"], ok["setting"])} - set(refs))
    for m, s in missing:
        notes.append(f"no dense run of {m} ({s}): no dense reference, Δ and retention left empty")
    df = T.add_dense_columns(df, refs)

    # per-layer sensitivity runs (prune.include varies) go to the heatmap, not the curves
    def per_layer(frame: pd.DataFrame) -> pd.Series:
        return frame["include"].map(bool) & ~frame["is_dense"]

    deduped = T.dedupe(df)
    points = T.aggregate_seeds(deduped)
    include_varies = df["include"].nunique() > 1
    is_layer = per_layer(points)
    sens = points[is_layer] if include_varies else points.iloc[0:0]
    curve_points = points[~is_layer] if include_varies else points
    points_t = T.aggregate_seeds(T.dedupe(df, by_device=True), by_device=True)
    curve_points_t = points_t[~per_layer(points_t)] if include_varies else points_t
    curve_note = "per-layer runs (prune.include varies): see sensitivity.png" if len(sens) else None
    if len(sens):
        notes.append(f"{_plural(len(sens), 'per-layer run')} (prune.include varies) "
                     f"{'is' if len(sens) == 1 else 'are'} shown in sensitivity.png, not on the curves")
    if len(ok) > len(deduped):
        notes.append(f"{_plural(len(ok) - len(deduped), 'repeated configuration')}: figures use the most recent run, "
                     f"tables list every run")
    multi = points[points["n_seeds"] > 1]
    if len(multi):
        notes.append(f"{_plural(len(multi), 'configuration')} ran with several prune.seed values (up to "
                     f"{int(multi['n_seeds'].max())}): figures show their mean with a shaded min–max band over the "
                     "seeds; the table 'Across seeds' gives mean (min–max) and the seeds")
    has_ci = _logged(ok, contract.interval_metrics("mAP50-95")[0])
    if has_ci:
        n_boot = sorted({int(v) for v in ok.get(metric(contract.BOOTSTRAP_RESAMPLES), pd.Series(dtype=float)).dropna()})
        notes.append(f"error bars on the accuracy curves: {100 * contract.INTERVAL_LEVEL:.0f}% percentile bootstrap "
                     f"intervals over the evaluated images ({'/'.join(map(str, n_boot))} resamples, eval.bootstrap); "
                     "runs without one have no bar")
    bad = df[df["outcome"] != "ok"]
    if len(bad):
        names = list(bad["run_name"].astype(str))
        shown = ", ".join(names[:8]) + (f", … ({len(names) - 8} more)" if len(names) > 8 else "")
        notes.append(f"{_plural(len(bad), 'run')} did not finish with metrics ({shown}): listed in the tables as "
                     f"missing, absent from the figures")
    if df["setting"].nunique() > 1:
        notes.append("runs differ in dataset, image size or precision: each setting is its own row of panels "
                     "with its own dense references, never mixed on one curve ("
                     + " | ".join(_uniq(df["setting"])) + ")")
    spread_col = metric(contract.LATENCY_SPREAD_B1)
    if spread_col in ok.columns:
        busy = ok[ok[spread_col] > contract.LATENCY_BUSY_SPREAD]
        if len(busy):
            worst = busy.loc[busy[spread_col].idxmax()]
            notes.append(f"busy machine: the batch-1 latency of {_plural(len(busy), 'run')} spread by more than "
                         f"{100 * contract.LATENCY_BUSY_SPREAD:.0f}% of its median (interquartile range; worst "
                         f"{100 * worst[spread_col]:.0f}%, {worst['run_name']}): {'its' if len(busy) == 1 else 'their'} ms figures are not reliable; the "
                         f"speed-up over dense (timed alternately in the same process) is less affected — rerun "
                         f"on a quiet machine to trust the timings")
    if (~ok["x_measured"]).any():
        notes.append("runs without a measured sparsity metric are plotted at their target sparsity")

    style = F.Style.build(df["model"], df["method"])
    label = sel.sweep_id if sel.mode != ALL else f"all runs of {sel.experiment_name}"
    ci = f" (bars: {100 * contract.INTERVAL_LEVEL:.0f}% CI)" if has_ci else ""
    acc_panels = [F.metric_panel(n, n + ci, f"{n} (COCO, 0–1)", interval=has_ci)
                  for n in ("mAP50-95", "mAP50", "AR100")]
    speed = [F.metric_panel("ms_inference", "Inference time", "inference (ms / image)", from_zero=True),
             F.metric_panel("gflops", "Compute", "GFLOPs per image", from_zero=True),
             F.metric_panel("params_nonzero", "Non-zero parameters", "non-zero parameters (millions)",
                            scale=1e-6, from_zero=True)]
    latency = [(contract.LATENCY_B1, "Latency, batch 1", "latency (ms / image, batch 1)")]
    for b in sorted({b for c in df.columns if (b := contract.latency_batch_of(c[len("metrics."):])) is not None}):
        latency.append((contract.latency_batch_metric(b), f"Latency, batch {b}", f"latency (ms / image, batch {b})"))
    # ONNX Runtime (eval.runtimes=[torch,onnxruntime]): panels next to PyTorch's, and why unstructured stays flat
    latency.append((contract.ORT_LATENCY_B1, "ONNX Runtime latency, batch 1", "ONNX Runtime (ms / image, batch 1)"))
    for b in sorted({b for c in df.columns if (b := contract.ort_latency_batch_of(c[len("metrics."):])) is not None}):
        latency.append((contract.ort_latency_batch_metric(b), f"ONNX Runtime latency, batch {b}",
                        f"ONNX Runtime (ms / image, batch {b})"))
    if _logged(ok, contract.ORT_LATENCY_B1):
        flat = sorted(_uniq(ok[~ok["is_dense"] & (ok["method"] != "channel")]["method"]))
        if flat:
            notes.append(f"ONNX Runtime latency stays flat for {', '.join(flat)}: these methods zero weights but "
                         "keep every tensor's shape, so the runtime's dense kernels do the same work; only "
                         "prune=channel removes channels, and with them time.")
    for name, title, ylabel in latency:
        if _logged(df, name):
            quartiles = _logged(df, contract.latency_quartiles(name)[0])  # ONNX Runtime's medians come without
            speed.append(F.latency_panel(name, title, ylabel, quartiles=quartiles))
    # cost does not depend on recovery: one curve per (model, method), the unrecovered run preferred
    speed_points = curve_points_t.sort_values("recover_key", kind="stable").drop_duplicates(
        ["timing_setting", "model", "method", "fused", "scope", "target"]).sort_index()

    # eval.profile: where the time goes, for the most pruned profiled run of each model and method (at most 4)
    profiles: list[tuple[str, pd.DataFrame]] = []
    prof_col = metric(contract.PROFILE_MS_B1)
    if prof_col in ok.columns:
        profiled = T.dedupe(ok[ok[prof_col].notna()])
        pruned_p = profiled[~profiled["is_dense"]]
        chosen = (pruned_p if len(pruned_p) else profiled).sort_values("target").groupby(
            ["model", "method"], sort=False).tail(1).head(4)
        for _, r in chosen.iterrows():
            table = Q.read_artifact_csv(sel, r["run_id"], contract.LAYER_PROFILE_CSV)
            if table is not None and {"ms", "dense_ms", "layer", "type"} <= set(table.columns):
                profiles.append((T.point_label(r), table))

    def make(page=None) -> dict[str, object]:
        """The figures: one each for the PNGs (page None); for the PDF, A4 pages, one per setting."""
        def per_group(frame, refs_, col, fn):
            groups = sorted(set(frame[col]))
            if page is None or len(groups) <= 1:
                return fn(frame, refs_)
            return [fn(frame[frame[col] == g], {k: v for k, v in refs_.items() if k[1] == g}) for g in groups]

        figs: dict[str, object] = {}
        figs["accuracy_vs_sparsity.png"] = per_group(curve_points, refs, "setting", lambda p, r: F.curve_figure(
            p, r, acc_panels, style, f"Accuracy vs sparsity · {label}", note=curve_note, page=page))
        figs["retention_vs_sparsity.png"] = per_group(curve_points, refs, "setting", lambda p, r: F.curve_figure(
            p, r, [F.retention_panel(n) for n in ("mAP50-95", "mAP50", "AR100")], style,
            f"Accuracy retained vs sparsity · {label}", note=curve_note, page=page))
        figs["speed_vs_sparsity.png"] = per_group(speed_points, refs_time, "timing_setting",
                                                  lambda p, r: F.curve_figure(
            p, r, speed, style, f"Speed and size vs sparsity · {label}", group_col="timing_setting",
            facet_recover=False, note=curve_note, page=page))
        figs["pareto.png"] = per_group(points_t, refs_time, "timing_setting", lambda p, r: F.pareto_figure(
            p, style, f"Accuracy vs cost, every model size on one front · {label}", page=page))
        if len(sens):
            figs["sensitivity.png"] = F.sensitivity_figure(sens, refs, f"Per-layer sensitivity · {label}", page=page)
        if profiles:
            figs["layer_time.png"] = F.layer_time_figure(profiles, f"Where the time goes (batch 1) · {label}", page=page)
        if curve_points[~curve_points["is_dense"]]["recover"].nunique() > 1:  # the question: what recovery buys
            figs["recovery.png"] = F.recovery_figure(curve_points, refs, f"What recovery buys · {label}", page=page)
        return figs

    figs = make()

    now = datetime.now(timezone.utc)
    title = f"YOLOv5 pruning report · {label}"
    fields = _title_fields(sel, df, now)
    table = T.summary_table(df)
    sections = []
    seeds = T.seed_table(curve_points)
    if len(seeds):
        sections.append(("Across seeds", "Configurations run with several `prune.seed` values: the mean over the "
                         "seeds, in brackets the smallest and largest value (min–max, not a standard deviation: "
                         "with a handful of seeds the range is the honest spread); the figures plot the same mean "
                         "with a shaded min–max band.", seeds))
    # the cross-size question (pruned yolov5m or dense yolov5s?): asked when the runs span model sizes
    budgets = T.budget_table(curve_points_t) if curve_points_t["model"].nunique() > 1 else pd.DataFrame()
    if len(budgets):
        sections.append(("Best run within a budget (every model size)", "For each cost axis and each model's dense "
                         "run as the budget: the most accurate run of any model size, method and sparsity that "
                         "costs at most as much (same data, image size, precision and device). A gain > 0 means a "
                         "pruned larger model beats the dense model at that cost; pareto.png shows the fronts.",
                         budgets))

    out_root.mkdir(parents=True, exist_ok=True)
    name = ALL if sel.mode == ALL else _safe_name(sel.sweep_id)
    out = out_root / name
    _remove_stale_builds(out_root, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_root))
    try:
        for fname, fig in figs.items():
            fig.savefig(tmp / fname, dpi=PNG_DPI)
        T.results_csv_frame(df).to_csv(tmp / "results.csv", index=False)
        (tmp / "results.md").write_text(_markdown(title, fields, notes, table, list(figs), sections), encoding="utf-8")
        pages = [P.title_page(title, fields, notes)]
        for fig in make(P.A4_LANDSCAPE).values():  # every figure again, laid out to fill an A4 page
            pages += fig if isinstance(fig, list) else [fig]
        pages += P.table_figures(table, f"Results · {label}")
        for heading, _, extra in sections:
            pages += P.table_figures(extra, f"{heading} · {label}")
        P.write_pdf(tmp / "report.pdf", pages, title)
        out.mkdir(parents=True, exist_ok=True)
        for fname in REPORT_FILES:  # drop a previous build's files (e.g. a stale sensitivity.png)
            (out / fname).unlink(missing_ok=True)
        written = []
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
            written.append(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if attach and sel.parent is not None:
        try:
            Q.attach(sel, written, ARTIFACT_DIR)
        except Exception as e:
            raise ReportError(f"report written to {out}, but attaching it to parent run "
                              f"{sel.parent_run_id} failed: {e}") from e
    log.info("report for %s written to %s", what, out)
    return out
