"""Figures as ``matplotlib.figure.Figure`` objects (no pyplot, no global backend switch).

Encoding, the same in every figure of a report: colour = model (fixed per YOLOv5 size), line style
and marker = pruning method, hollow markers = a variant (fused/unfused or another layer scope) when
that varies. Dashed lines in a model's colour are its dense (sparsity 0) value. One row of panels per
setting (dataset · image size · precision; timing figures also per device); when ``recover.method``
varies, recovered and unrecovered panels of the same metric sit side by side with a shared y axis.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from sweep import contract

from .common import metric
from .tables import (SEED_MAX, SEED_MIN, DenseRef, _missing, layer_index, model_sort_key, point_label,
                     recover_sort_key)

SIZE_COLOURS = {"n": "#1f77b4", "s": "#ff7f0e", "m": "#2ca02c", "l": "#d62728", "x": "#9467bd"}
EXTRA_COLOURS = ["#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#637939",
                 "#8c6d31", "#843c39", "#7b4173"]
LINESTYLES = ["-", ":", "-.", (0, (3, 1, 1, 1, 1, 1)), (0, (6, 1.5)), (0, (1, 1))]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DENSE_LS = (0, (4, 3))
PANEL_W, PANEL_H = 4.3, 3.3
MAX_COLS = 3  # metric panels per row before wrapping (2 metrics x 2 when recover varies)
X_LABEL = "measured sparsity (% zero weights)"


PAGE_TITLE_IN, PAGE_LEGEND_IN = 0.75, 0.75   # room for the suptitle and the legend on a page (inches)
PAGE_FONT = 1.2  # font scale on a PDF page: read at 100% on paper, not shrunk like a screen PNG


def fit_columns(n: int, rows_per_group: int, page: tuple[float, float], step: int = 1,
                aspect: float = 1.45) -> int:
    """Panels per row that fill ``page`` best: the panel shape nearest ``aspect`` (width / height).

    ``n`` panels per group (``rows_per_group`` groups stacked), ``step``: the columns come in
    multiples of it (recover variants stay side by side).
    """
    w, h = page
    best, best_score = step, math.inf
    for cols in range(step, max(step, n) + 1, step):
        rows = math.ceil(n / cols) * rows_per_group
        pw, ph = w / cols, (h - PAGE_TITLE_IN - PAGE_LEGEND_IN) / rows
        score = abs(math.log((pw / ph) / aspect)) + 0.15 * (cols * math.ceil(n / cols) - n)
        if score < best_score:
            best, best_score = cols, score
    return best


@dataclass
class Style:
    colours: dict[str, str]
    linestyles: dict[str, object]
    markers: dict[str, str]

    @classmethod
    def build(cls, models, methods) -> "Style":
        colours: dict[str, str] = {}
        spare = list(EXTRA_COLOURS)
        for m in sorted(set(models), key=model_sort_key):
            size = None
            hit = re.match(r"^yolov\d+([nsmlx])", str(m))
            if hit:
                size = hit.group(1)
            want = SIZE_COLOURS.get(size) if size else None
            if want is None or want in colours.values():
                want = spare.pop(0) if spare else "#333333"
            colours[m] = want
        ms = sorted(set(methods))
        return cls(colours,
                   {m: LINESTYLES[i % len(LINESTYLES)] for i, m in enumerate(ms)},
                   {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(ms)})

    def colour(self, model: str) -> str:
        return self.colours.get(model, "#333333")


@dataclass
class Panel:
    """One y quantity: the frame column, labels, a scale, and how to read it off a dense reference."""

    column: str
    title: str
    ylabel: str
    scale: float = 1.0
    dense: Optional[Callable[[DenseRef], float]] = None
    ref_line: Optional[float] = None
    from_zero: bool = False   # cost axes start at 0, so a flat line reads as flat
    spread: Optional[tuple[str, str]] = None  # metric names of the low/high spread (error bars, dense band)


def latency_panel(name: str, title: str, ylabel: str, quartiles: bool = True) -> Panel:
    """A latency median with its interquartile range as error bars (and as a band around the dense line);
    ``quartiles=False`` for a median logged without them (ONNX Runtime's)."""
    if not quartiles:
        return Panel(metric(name), title + " (median)", ylabel, dense=lambda r, n=name: r.get(n), from_zero=True)
    return Panel(metric(name), title + " (median; bars, band: IQR)", ylabel, dense=lambda r, n=name: r.get(n),
                 from_zero=True, spread=contract.latency_quartiles(name))


def metric_panel(name: str, title: str, ylabel: str, scale: float = 1.0, from_zero: bool = False,
                 interval: bool = False) -> Panel:
    """``interval``: the metric's bootstrap confidence interval (``<name>_lo`` / ``_hi``) as error bars and as a
    band around the dense line."""
    return Panel(metric(name), title, ylabel, scale, dense=lambda r, n=name: r.get(n) * scale,
                 from_zero=from_zero, spread=contract.interval_metrics(name) if interval else None)


def retention_panel(name: str) -> Panel:
    return Panel(f"retention.{name}", f"{name} retained", f"{name} (% of the model's dense value)",
                 dense=lambda r, n=name: 100.0 if not math.isnan(r.get(n)) else float("nan"),
                 ref_line=100.0)


def _legend(fig: Figure, style: Style, models, methods, variants: list[str], dense: bool,
            extra: Optional[list] = None, fs: float = 1.0) -> None:
    handles = [Line2D([], [], color=style.colour(m), marker="o", lw=2, label=m)
               for m in sorted(set(models), key=model_sort_key)]
    handles += [Line2D([], [], color="0.25", ls=style.linestyles[m], marker=style.markers[m], lw=1.5,
                       label=m) for m in sorted(set(methods))]
    if len(variants) > 1:
        handles += [Line2D([], [], color="0.25", ls="none", marker="o",
                           mfc="0.25" if i == 0 else "white", label=v) for i, v in enumerate(variants)]
    if dense:
        handles.append(Line2D([], [], color="0.35", ls=DENSE_LS, lw=1.2, label="dense (sparsity 0)"))
    handles += extra or []
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7 if fs == 1 else 5),
                   frameon=False, fontsize=8.5 * fs)


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.5")


def _hide_unused(axes: np.ndarray, used: int) -> None:
    """Blank the cells of a panel grid (``fig.subplots(..., squeeze=False)`` or a block of its rows) after the
    first ``used`` (row-major)."""
    for ax in axes.flat[used:]:
        ax.set_axis_off()


def _style_axes(ax, xlabel: str, ylabel: Optional[str], fs: float, axis: str = "both", which: str = "major") -> None:
    """Every panel's axis labels, grid and tick labels (``fs``: the font scale, PAGE_FONT on a PDF page)."""
    ax.set_xlabel(xlabel, fontsize=9 * fs)
    if ylabel is not None:
        ax.set_ylabel(ylabel, fontsize=9 * fs)
    ax.grid(alpha=0.3, axis=axis, which=which)
    ax.tick_params(axis=axis, labelsize=8 * fs)


def curve_figure(points: pd.DataFrame, refs: dict[tuple[str, str], DenseRef], panels: list[Panel],
                 style: Style, title: str, group_col: str = "setting", facet_recover: bool = True,
                 note: Optional[str] = None, page: Optional[tuple[float, float]] = None) -> Figure:
    """Lines of ``panel.column`` versus measured sparsity, one per (model, method[, variant]).

    ``points`` are finished, de-duplicated runs (dense ones included); ``refs`` the dense references
    keyed (model, group label). ``page`` (inches): the figure is that size and its panels are arranged
    to fill it, with larger text (a PDF page); else its size follows the panel count (a PNG).
    A panel with a ``spread`` draws those metrics as error bars; points averaged over several ``prune.seed``
    values (``seedmin.<column>`` / ``seedmax.<column>``, tables.aggregate_seeds) get a shaded min-max band.
    """
    groups = sorted(set(points[group_col]) | {g for _, g in refs})
    recs: list[Optional[str]] = [None]
    if facet_recover and points["recover"].nunique() > 1:
        recs = sorted(points["recover"].unique(), key=recover_sort_key)
    cols = [(p, r) for p in panels for r in recs]
    # wrap long rows (keeping the recover variants of one metric together): at most ~3 metrics a row
    per_row = min(len(recs) * (MAX_COLS if len(recs) == 1 else max(1, 4 // len(recs))), len(cols))
    fs = 1.0
    if page is not None:
        per_row = fit_columns(len(cols), len(groups), page, step=len(recs))
        fs = PAGE_FONT
    sub_rows = math.ceil(len(cols) / per_row)
    pruned_all = points[~points["is_dense"]]
    variant_cols = [c for c in ("fused", "scope") if pruned_all[c].nunique() > 1]

    def variant(row) -> str:
        return " · ".join(f"{c}={row[c]}" if c == "fused" else str(row[c]) for c in variant_cols)

    variants = sorted({variant(r) for _, r in pruned_all.iterrows()}) if variant_cols else [""]
    nrows = len(groups) * sub_rows
    size = page or (max(PANEL_W * per_row, 7.5), PANEL_H * nrows + 1.3)
    seeds_drawn = 0  # the most seeds behind one drawn band (0: none), for the legend
    fig = Figure(figsize=size, layout="constrained")
    grid = fig.subplots(nrows, per_row, squeeze=False)
    for i in range(len(groups)):  # unused cells of a wrapped row
        _hide_unused(grid[i * sub_rows:(i + 1) * sub_rows], len(cols))
    axes = [[grid[i * sub_rows + j // per_row][j % per_row] for j in range(len(cols))]
            for i in range(len(groups))]
    for i, g in enumerate(groups):
        for j, (panel, rec) in enumerate(cols):
            ax = axes[i][j]
            sub = points[points[group_col] == g]
            if rec is not None:
                sub = sub[sub["recover"] == rec]
            drawn = 0
            curved_models = set()
            pruned = sub[~sub["is_dense"]]
            keys = ["model", "method"] + variant_cols
            for key, c in pruned.groupby(keys, sort=False):
                model, method = key[0], key[1]
                c = c[c[panel.column].notna()] if panel.column in c.columns else c.iloc[0:0]
                if c.empty:
                    continue
                xs = list(c["x"])
                ys = list(c[panel.column] * panel.scale)
                ref = refs.get((model, g))
                if ref is not None and panel.dense is not None and not math.isnan(panel.dense(ref)):
                    xs.insert(0, ref.x)
                    ys.insert(0, panel.dense(ref))
                order = np.argsort(xs, kind="stable")
                vi = variants.index(variant(c.iloc[0])) if variant_cols else 0
                ax.plot(np.asarray(xs)[order], np.asarray(ys)[order], color=style.colour(model),
                        ls=style.linestyles[method], marker=style.markers[method], ms=5, lw=1.6,
                        mfc=style.colour(model) if vi == 0 else "white", mew=1.3, zorder=3)
                smin, smax = SEED_MIN + panel.column, SEED_MAX + panel.column
                if smin in c.columns and c[smin].notna().any():  # min-max over prune.seed
                    s = c[c[smin].notna()].sort_values("x")
                    ax.fill_between(s["x"], s[smin] * panel.scale, s[smax] * panel.scale, color=style.colour(model),
                                    alpha=0.18, lw=0, zorder=1)
                    ax.vlines(s["x"], s[smin] * panel.scale, s[smax] * panel.scale, color=style.colour(model),
                              alpha=0.35, lw=3, zorder=2)
                    seeds_drawn = max(seeds_drawn, int(s["n_seeds"].max()))
                if panel.spread is not None:
                    lo_c, hi_c = (metric(n) for n in panel.spread)
                    if lo_c in c.columns and hi_c in c.columns and c[lo_c].notna().any():
                        y = c[panel.column] * panel.scale
                        lo = (y - c[lo_c] * panel.scale).clip(lower=0).fillna(0)
                        hi = (c[hi_c] * panel.scale - y).clip(lower=0).fillna(0)
                        ax.errorbar(c["x"], y, yerr=[lo, hi], fmt="none", ecolor=style.colour(model),
                                    elinewidth=1.2, capsize=3, zorder=3)
                curved_models.add(model)
                drawn += 1
            for (model, rg), ref in refs.items():
                if rg != g or panel.dense is None:
                    continue
                v = panel.dense(ref)
                if math.isnan(v):
                    continue
                if panel.ref_line is None:
                    ax.axhline(v, color=style.colour(model), ls=DENSE_LS, lw=1.1, alpha=0.75, zorder=1)
                if panel.spread is not None:  # the dense model's own noise: a point inside the band is no faster
                    lo, hi = (ref.get(n) * panel.scale for n in panel.spread)
                    if not (math.isnan(lo) or math.isnan(hi)):
                        ax.axhspan(lo, hi, color=style.colour(model), alpha=0.12, lw=0, zorder=0)
                if model not in curved_models:  # a dense-only model: show its point
                    ax.plot([ref.x], [v], ls="none", marker="o", ms=6, color=style.colour(model), zorder=3)
                drawn += 1
            if panel.ref_line is not None:
                ax.axhline(panel.ref_line, color="0.35", ls=DENSE_LS, lw=1.1, zorder=1)
            t = panel.title + (f" · recover={rec}" if rec is not None else "")
            if len(groups) > 1:
                t += f"\n{g}"
            ax.set_title(t, fontsize=10 * fs)
            _style_axes(ax, X_LABEL, panel.ylabel, fs)
            if panel.from_zero and drawn:
                ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.05)
            if not drawn:
                _no_data(ax)
        # recovered / unrecovered panels of one metric share their y range
        if len(recs) > 1:
            for p_i in range(len(panels)):
                row = [axes[i][p_i * len(recs) + k] for k in range(len(recs))]
                lo = min(a.get_ylim()[0] for a in row)
                hi = max(a.get_ylim()[1] for a in row)
                for a in row:
                    a.set_ylim(lo, hi)
    sup = title if len(groups) > 1 else f"{title}{chr(10) if page else ' — '}{groups[0]}"
    if note:
        sup += f"\n{note}"
    fig.suptitle(sup, fontsize=12 * fs)
    has_dense = any(p.dense is not None for p in panels) and bool(refs)
    extra = []
    if seeds_drawn:
        extra.append(Patch(color="0.5", alpha=0.35, label=f"shaded: min–max over prune.seed (up to {seeds_drawn} "
                                                             "seeds; line: their mean)"))
    _legend(fig, style, points["model"], points["method"], variants if variant_cols else [], has_dense, extra,
            fs=fs)
    return fig


def pareto_front(cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats (lower-or-equal cost and higher value), by cost."""
    order = np.lexsort((-value, cost))
    front, best = [], -math.inf
    for k in order:
        if value[k] > best:
            front.append(k)
            best = value[k]
    return np.asarray(front, dtype=int)


REL_LATENCY, REL_LATENCY_LO, REL_LATENCY_HI = "report.rel_latency", "report.rel_latency_lo", "report.rel_latency_hi"
REL_LATENCY_LABEL = "batch-1 latency / dense's (timed alternately in one process; bars: IQR)"


def with_relative_latency(points: pd.DataFrame) -> pd.DataFrame:
    """Adds the batch-1 latency relative to the dense model timed alongside (1 / speed-up) and its spread:
    each model's interquartile range relative to its median, combined (both were timed under the same load)."""
    cols = [metric(n) for n in (contract.LATENCY_SPEEDUP_B1, contract.LATENCY_B1, contract.LATENCY_DENSE_B1,
                               *contract.latency_quartiles(contract.LATENCY_B1),
                               *contract.latency_quartiles(contract.LATENCY_DENSE_B1))]
    if not all(c in points.columns for c in cols):
        return points
    speedup, med, dmed, q1, q3, dq1, dq3 = (points[c] for c in cols)
    rel = 1.0 / speedup
    lo_rel = np.sqrt(((med - q1) / med) ** 2 + ((dq3 - dmed) / dmed) ** 2)
    hi_rel = np.sqrt(((q3 - med) / med) ** 2 + ((dmed - dq1) / dmed) ** 2)
    return points.assign(**{REL_LATENCY: rel, REL_LATENCY_LO: rel * (1 - lo_rel), REL_LATENCY_HI: rel * (1 + hi_rel)})


def cost_axes(points: pd.DataFrame) -> list[tuple[str, str, str, float]]:
    """The cost axes the runs have, as (column, panel title, x label, scale): batch-1 latency, non-zero
    parameters, GFLOPs, compressed size.

    Latency: relative to the model's own dense run (timed alternately, robust to a busy machine) when one
    model is shown; absolute milliseconds (same device only: one row per timing setting) when several
    are, since relative latencies of two model sizes are not comparable; ms/image of the inference stage
    for runs logged before the latency metrics existed.
    """
    models = points["model"].nunique() if len(points) else 0
    if models <= 1 and REL_LATENCY in points.columns and points[REL_LATENCY].notna().any():
        time_cost = (REL_LATENCY, "mAP50-95 vs latency relative to dense", REL_LATENCY_LABEL, 1.0)
    elif metric(contract.LATENCY_B1) in points.columns and points[metric(contract.LATENCY_B1)].notna().any():
        time_cost = (metric(contract.LATENCY_B1), "mAP50-95 vs batch-1 latency", "batch-1 latency (ms; bars: IQR)",
                     1.0)
    else:
        time_cost = (metric("ms_inference"), "mAP50-95 vs inference time", "inference (ms/image)", 1.0)
    costs = [time_cost,
             (metric("params_nonzero"), "mAP50-95 vs non-zero parameters", "non-zero parameters (millions)", 1e-6),
             (metric("gflops"), "mAP50-95 vs compute", "GFLOPs per image", 1.0),
             (metric("size_mb_compressed"), "mAP50-95 vs compressed size", "compressed weights (MB, zstd)", 1.0)]
    return [c for c in costs if c[0] in points.columns and points[c[0]].notna().any()] or costs[:2]


def pareto_figure(points: pd.DataFrame, style: Style, title: str,
                  page: Optional[tuple[float, float]] = None) -> Figure:
    """Every run of every model size on one accuracy-vs-cost plot per cost axis (:func:`cost_axes`), one
    block of panels per timing setting; the Pareto-optimal runs (no run is at most as costly and more
    accurate) are ringed, joined and labelled model·method·sparsity (``page``: that figure size, larger text)."""
    points = with_relative_latency(points)
    costs = cost_axes(points)
    groups = sorted(points["timing_setting"].unique()) if len(points) else ["(no runs)"]
    fs = PAGE_FONT if page is not None else 1.0
    ncols = min(2, len(costs))
    sub_rows = math.ceil(len(costs) / ncols)
    fig = Figure(figsize=page or (ncols * 5.6, 4.2 * sub_rows * len(groups) + 1.3), layout="constrained")
    grid = fig.subplots(sub_rows * len(groups), ncols, squeeze=False)
    ycol = metric("mAP50-95")
    recovered = sorted(r for r in points["recover"].unique() if r != "none") if len(points) else []
    for i, g in enumerate(groups):
        sub = points[points["timing_setting"] == g]
        _hide_unused(grid[i * sub_rows:(i + 1) * sub_rows], len(costs))
        for j, (col, t, xlabel, scale) in enumerate(costs):
            ax = grid[i * sub_rows + j // ncols][j % ncols]
            d = sub[sub[ycol].notna() & sub[col].notna()] if col in sub.columns else sub.iloc[0:0]
            if d.empty:
                _no_data(ax, f"no {xlabel}")
            else:
                for _, r in d.iterrows():
                    c = style.colour(r["model"])
                    ax.plot([r[col] * scale], [r[ycol]], ls="none", marker=style.markers[r["method"]], ms=7,
                            color=c, mfc=c if r["recover"] == "none" else "white", mew=1.4, zorder=3)
                    if col == REL_LATENCY and not math.isnan(r[REL_LATENCY_LO]):  # its noise, both models'
                        ax.errorbar([r[col]], [r[ycol]], xerr=[[r[col] - r[REL_LATENCY_LO]], [r[REL_LATENCY_HI] - r[col]]],
                                    fmt="none", ecolor=c, elinewidth=1.2, capsize=3, zorder=3)
                    if col == metric(contract.LATENCY_B1):
                        q1, q3 = (metric(n) for n in contract.latency_quartiles(contract.LATENCY_B1))
                        if q1 in r.index and not _missing(r[q1]) and not _missing(r[q3]):
                            ax.errorbar([r[col]], [r[ycol]], xerr=[[max(r[col] - r[q1], 0)], [max(r[q3] - r[col], 0)]],
                                        fmt="none", ecolor=c, elinewidth=1.0, capsize=2, zorder=3)
                if col == REL_LATENCY:
                    ax.axvline(1.0, color="0.35", ls=DENSE_LS, lw=1.1, zorder=1)
                cost, val = d[col].to_numpy(float) * scale, d[ycol].to_numpy(float)
                f = pareto_front(cost, val)
                fx, fy = cost[f], val[f]
                ax.plot(fx, fy, color="0.1", lw=1.1, drawstyle="steps-post", zorder=2)
                ax.plot(fx, fy, ls="none", marker="o", ms=12, mfc="none", mec="0.1", mew=1.0, zorder=4)
                for n, k in enumerate(f):  # alternate above / below so neighbours do not overprint
                    ax.annotate(point_label(d.iloc[k]), (cost[k], val[k]), xytext=(7, -10 if n % 2 else 6),
                                textcoords="offset points", fontsize=6.5 * fs, color="0.15")
                if cost.min() > 0 and cost.max() / cost.min() > 20:
                    ax.set_xscale("log")
                ax.margins(x=0.12, y=0.08)  # room for the front labels
            tt = t + (f"\n{g}" if len(groups) > 1 else "")
            ax.set_title(tt, fontsize=10 * fs)
            _style_axes(ax, xlabel + (" — log scale" if ax.get_xscale() == "log" else ""), "mAP50-95", fs,
                        which="both")
    sup = title if len(groups) > 1 else f"{title}{chr(10) if page else ' — '}{groups[0]}"
    fig.suptitle(sup, fontsize=12 * fs)
    extra = [Line2D([], [], color="0.1", lw=1.1, marker="o", mfc="none", ms=10,
                    label="Pareto front, all model sizes (labels: model·method·sparsity)")]
    if recovered:
        extra.append(Line2D([], [], ls="none", marker="o", color="0.25", mfc="white",
                            label=f"hollow: recover={', '.join(recovered)}"))
    _legend(fig, style, points["model"], points["method"], [], False, extra, fs=fs)
    return fig


RECOVERY_COLOURS = {"none": "0.55", "bn": "#1f77b4"}
FINETUNE_CMAP = "Greens"


def recovery_colours(labels) -> dict[str, object]:
    """none grey, bn blue, fine-tune budgets in greens that darken with the budget."""
    from matplotlib import colormaps

    ft = sorted((r for r in set(labels) if r not in RECOVERY_COLOURS), key=recover_sort_key)
    cmap = colormaps[FINETUNE_CMAP]
    out: dict[str, object] = {r: c for r, c in RECOVERY_COLOURS.items() if r in set(labels)}
    out |= {r: cmap(0.45 + 0.5 * (i + 1) / len(ft)) for i, r in enumerate(ft)}
    return out


def recovery_figure(points: pd.DataFrame, refs: dict[tuple[str, str], DenseRef], title: str,
                    page: Optional[tuple[float, float]] = None) -> Figure:
    """What recovery buys, one row per (setting, model, pruning method): mAP50-95 versus measured sparsity,
    one line per recovery (none, bn, each fine-tune budget) with the dense value dashed; and, when
    fine-tuning ran, mAP50-95 versus the fine-tune iterations actually run, one line per sparsity, starting
    at BatchNorm recalibration alone (0 iterations, when that ran too).

    ``points``: finished, de-duplicated (seed-averaged) runs; ``refs``: dense references by (model, setting).
    """
    ycol, xcol, iters = metric("mAP50-95"), "x", metric("recover_iters")
    pruned = points[~points["is_dense"]]
    combos = sorted(pruned.groupby(["setting", "model", "method"], sort=False).groups,
                    key=lambda k: (k[0], model_sort_key(k[1]), k[2]))
    has_ft = (pruned["recover"].str.startswith("finetune")).any()
    # with fine-tuning each row is one combination's two panels; without, the combinations fill two columns
    ncols = 2 if has_ft or len(combos) > 2 else 1
    nrows = max(len(combos), 1) if has_ft else max(math.ceil(len(combos) / ncols), 1)
    fs = PAGE_FONT if page is not None else 1.0
    fig = Figure(figsize=page or (5.4 * ncols, 3.6 * nrows + 1.0), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    if not has_ft:
        _hide_unused(axes, len(combos))
    colours = recovery_colours(pruned["recover"])
    for row, (setting, model, method) in enumerate(combos):
        d = pruned[(pruned["setting"] == setting) & (pruned["model"] == model) & (pruned["method"] == method)]
        ax = axes[row][0] if has_ft else axes[row // ncols][row % ncols]
        # recovery needs the unfused order; a fused no-recovery line is still the baseline users compare with
        two_orders = d["fused"].nunique() > 1
        for (rec, fused), line in sorted(d.groupby(["recover", "fused"]), key=lambda kv: recover_sort_key(kv[0][0])):
            line = line.sort_values(xcol)
            label = rec + ((" (fused)" if str(fused) == "True" else " (unfused)") if two_orders else "")
            ax.plot(line[xcol], line[ycol], marker="o", ms=5, lw=1.6, color=colours[rec], label=label,
                    ls="-" if str(fused) != "True" or not two_orders else "--")
        ref = refs.get((model, setting))
        dense = ref.get("mAP50-95") if ref is not None else float("nan")  # dashed on both panels of the row
        if not math.isnan(dense):
            ax.axhline(dense, color="0.2", ls=DENSE_LS, lw=1.1)
        where = f"{model} · {method}"
        ax.set_title(f"{where}: accuracy by recovery" + (f"\n{setting}" if len(set(k[0] for k in combos)) > 1
                                                          else ""), fontsize=10 * fs)
        _style_axes(ax, X_LABEL, "mAP50-95", fs)
        ax.legend(fontsize=7.5 * fs, frameon=False)
        if not has_ft:
            continue
        ax = axes[row][1]  # has_ft: the fine-tune budget panel beside it
        ft = d[d["recover"].str.startswith("finetune") & (d[iters].notna() if iters in d.columns else False)]
        base = d[d["recover"] == "bn"].assign(**{iters: 0.0}) if iters in d.columns else d.iloc[0:0]
        budget = pd.concat([base, ft]) if len(ft) else ft
        if budget.empty:
            _no_data(ax, "no fine-tune iterations logged")
        for target in sorted(budget["target"].unique()):
            line = budget[budget["target"] == target].sort_values(iters)
            ax.plot(line[iters], line[ycol], marker="o", ms=5, lw=1.6,
                    label=f"sparsity {contract.sparsity_label(target)}")
        if not math.isnan(dense):
            ax.axhline(dense, color="0.2", ls=DENSE_LS, lw=1.1)
        ax.set_title(f"{where}: accuracy vs fine-tune budget", fontsize=10 * fs)
        _style_axes(ax, "fine-tune iterations run (0: BatchNorm recalibration only)", "mAP50-95", fs)
        if len(budget):
            ax.legend(fontsize=7.5 * fs, frameon=False)
    if not combos:
        _no_data(axes[0][0], "no pruned runs")
    fig.suptitle(title, fontsize=12 * fs)
    fig.legend(handles=[Line2D([], [], color="0.2", ls=DENSE_LS, lw=1.1, label="dense (sparsity 0)")],
               loc="outside lower center", frameon=False, fontsize=8.5 * fs)
    return fig


def layer_time_figure(profiles: list[tuple[str, pd.DataFrame]], title: str,
                      page: Optional[tuple[float, float]] = None) -> Figure:
    """Where the time goes (``eval.profile``): per top-level layer, the batch-1 milliseconds of the dense model
    (grey) and of the pruned one (coloured), one panel per profiled run; the title gives the totals.

    ``profiles``: (run label, ``sweep.export.profile.layer_time_table`` frame) pairs.
    """
    fs = PAGE_FONT if page is not None else 1.0
    n = max(len(profiles), 1)
    ncols = 1 if n == 1 else 2
    nrows = math.ceil(n / ncols)
    layers = max((len(t) for _, t in profiles), default=1)
    fig = Figure(figsize=page or (6.4 * ncols, (0.2 * layers + 1.4) * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    _hide_unused(axes, len(profiles))
    for k, (label, t) in enumerate(profiles):
        ax = axes[k // ncols][k % ncols]
        y = np.arange(len(t))
        ax.barh(y - 0.2, t["dense_ms"], height=0.4, color="0.7", label="dense")
        ax.barh(y + 0.2, t["ms"], height=0.4, color="#d62728", label="pruned")
        ax.set_yticks(y, [f"{int(r.layer)} {r.type}" for r in t.itertuples()], fontsize=6.5 * fs)
        ax.invert_yaxis()
        dense, mine = float(t["dense_ms"].sum()), float(t["ms"].sum())
        ax.set_title(f"{label}\n{dense:.1f} ms dense -> {mine:.1f} ms ({dense / mine:.2f}x)" if mine > 0 else label,
                     fontsize=9.5 * fs)
        _style_axes(ax, "ms per batch-1 forward pass (torch.profiler)", None, fs, axis="x")
    if not profiles:
        _no_data(axes[0][0], "no profiled runs")
    fig.suptitle(title, fontsize=12 * fs)
    fig.legend(handles=[Patch(color="0.7", label="dense model"), Patch(color="#d62728", label="pruned model")],
               loc="outside lower center", ncol=2, frameon=False, fontsize=8.5 * fs)
    return fig


def sensitivity_figure(runs: pd.DataFrame, refs: dict[tuple[str, str], DenseRef], title: str,
                       page: Optional[tuple[float, float]] = None) -> Figure:
    """Heatmaps layer x target sparsity, colour = mAP50-95 drop from the dense model (points).

    ``runs``: finished, de-duplicated runs with a non-empty ``include`` and target > 0.
    """
    combos = list(runs.groupby(["setting", "model", "method", "recover"], sort=False))
    combos.sort(key=lambda kv: (kv[0][0], model_sort_key(kv[0][1]), kv[0][2], kv[0][3]))
    ncols = 1 if len(combos) == 1 else 2
    nrows = math.ceil(len(combos) / ncols)
    layers_max = max((r["include"].map(", ".join).nunique() for _, r in combos), default=1)
    h = max(3.2, 0.32 * layers_max + 1.6)
    fs = PAGE_FONT if page is not None else 1.0
    fig = Figure(figsize=page or (6.6 * ncols, h * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    ycol = metric("mAP50-95")
    for k, ((setting, model, method, recover), d) in enumerate(combos):
        ax = axes[k // ncols][k % ncols]
        d = d.assign(layer=d["include"].map(", ".join))
        first = d.drop_duplicates("layer").set_index("layer")["include"]
        layers = sorted(first.index, key=lambda l: (layer_index(first[l][0]) if first[l] else math.inf, l))
        targets = sorted(d["target"].unique())
        ref = refs.get((model, setting))
        dense = ref.get("mAP50-95") if ref is not None else float("nan")
        has_dense = not math.isnan(dense)
        grid = np.full((len(layers), len(targets)), np.nan)
        for _, r in d.iterrows():
            v = r[ycol]
            grid[layers.index(r["layer"]), targets.index(r["target"])] = 100 * (dense - v) if has_dense else 100 * v
        finite = grid[np.isfinite(grid)]
        if has_dense:
            lo = float(min(finite.min(), 0.0)) if finite.size else 0.0
            hi = float(max(finite.max(), 0.0)) if finite.size else 1.0
            span = max(abs(lo), abs(hi), 0.1)
            norm = TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span)
            im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
            cb_label = "mAP50-95 drop from dense (points)"
        else:
            im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
            cb_label = "mAP50-95 (points; no dense run)"
        # the numbers in the cells grow with the cells (a few layers on an A4 page: large cells, large text)
        cell_pt = fig.get_figheight() * 72 * 0.75 / (nrows * max(len(layers), 1))
        cell_fs = min(13.0, max(6.5, 0.3 * cell_pt))
        if grid.size <= 400:
            for (a, b), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    rgba = im.cmap(im.norm(v))
                    light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.55
                    ax.text(b, a, f"{v:.1f}", ha="center", va="center", fontsize=cell_fs,
                            color="black" if light else "white")
        ax.set_xticks(range(len(targets)), [contract.sparsity_label(t) for t in targets], fontsize=8 * fs,
                      rotation=45 if len(targets) > 8 else 0)
        ax.set_yticks(range(len(layers)), [l if len(l) <= 32 else l[:31] + "…" for l in layers],
                      fontsize=min(7.5 * fs, max(6.0, 0.5 * cell_pt)))
        ax.set_xlabel("target sparsity of the pruned layer", fontsize=9 * fs)
        ax.set_ylabel("pruned layer (network order)", fontsize=9 * fs)
        dense_txt = f"dense mAP50-95 {dense:.3f}" if has_dense else "no dense run"
        ax.set_title(f"{model} · {method} · recover={recover}\n{setting} · {dense_txt}", fontsize=9.5 * fs)
        bar = fig.colorbar(im, ax=ax, shrink=0.9)
        bar.set_label(cb_label, fontsize=9 * fs)
        bar.ax.tick_params(labelsize=8 * fs)
    _hide_unused(axes, len(combos))
    fig.suptitle(title, fontsize=12 * fs)
    return fig
