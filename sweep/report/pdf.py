"""The multi-page PDF: a title page, every figure (vector), and the results table."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

A4_LANDSCAPE = (11.69, 8.27)
ROWS_PER_PAGE = 28
STATUS_CHARS = 48


def table_pages(table: pd.DataFrame) -> int:
    """How many pages ``table`` takes in the PDF."""
    return max(1, math.ceil(len(table) / ROWS_PER_PAGE))


def title_page(title: str, fields: list[tuple[str, str]], notes: list[str]) -> Figure:
    """Key facts of the sweep, then the notes (cut with a pointer to results.md when they overflow)."""
    fig = Figure(figsize=A4_LANDSCAPE)
    fig.text(0.06, 0.93, title, fontsize=20, weight="bold", va="top")
    y = 0.84
    for key, value in fields:
        lines = textwrap.wrap(str(value), 100) or ["—"]
        fig.text(0.06, y, key, fontsize=10.5, weight="bold", va="top")
        for line in lines[:2]:
            fig.text(0.24, y, line, fontsize=10.5, va="top",
                     family="monospace" if key in ("git commit", "parent run") else None)
            y -= 0.034
        y -= 0.006
    if notes:
        y -= 0.015
        fig.text(0.06, y, "Notes", fontsize=10.5, weight="bold", va="top")
        y -= 0.035
        lines = []
        for n in notes:
            lines += [("• " if k == 0 else "   ") + line for k, line in enumerate(textwrap.wrap(n, 150))]
        room = max(1, int((y - 0.02) / 0.027))
        if len(lines) > room:
            lines = lines[:room - 1] + ["… more notes in results.md"]
        for line in lines:
            fig.text(0.07, y, line, fontsize=8.5, va="top")
            y -= 0.027
    return fig


def table_figures(table: pd.DataFrame, title: str) -> list[Figure]:
    """The summary table, ``ROWS_PER_PAGE`` rows per landscape page, drawn as vector text."""
    figs = []
    pages = table_pages(table)
    cols = list(table.columns)
    # column widths from the longest cell (characters), normalised to the page width
    table = table.copy()
    if "status" in table.columns:
        table["status"] = [v if len(v) <= STATUS_CHARS else v[:STATUS_CHARS - 1] + "…"
                           for v in table["status"].astype(str)]
    width = [max([len(str(c))] + [len(str(v)) for v in table[c]]) + 2 for c in cols]
    total = float(sum(width))
    for p in range(pages):
        chunk = table.iloc[p * ROWS_PER_PAGE:(p + 1) * ROWS_PER_PAGE]
        fig = Figure(figsize=A4_LANDSCAPE)
        ax = fig.add_axes((0.03, 0.04, 0.94, 0.86))
        ax.set_axis_off()
        suffix = f" (page {p + 1}/{pages})" if pages > 1 else ""
        fig.text(0.03, 0.95, title + suffix, fontsize=13, weight="bold", va="top")
        if len(chunk):
            cells = [[str(v) for v in row] for row in chunk.itertuples(index=False)]
            tab = ax.table(cellText=cells, colLabels=cols, loc="upper center", cellLoc="left",
                           colWidths=[w / total for w in width])
            tab.auto_set_font_size(False)
            fontsize = 7 if total < 190 else 6
            tab.set_fontsize(fontsize)
            tab.scale(1.0, 1.25)
            for (r, _c), cell in tab.get_celld().items():
                if r == 0:
                    cell.set_text_props(weight="bold")
                    cell.set_facecolor("#e8e8e8")
                elif "ok" != str(cells[r - 1][-1]) and cols[-1] == "status":
                    cell.set_facecolor("#fbe3e3")
        else:
            ax.text(0.5, 0.5, "no runs", ha="center")
        figs.append(fig)
    return figs


def write_pdf(path: Path, pages: list[Figure], title: str) -> None:
    with PdfPages(path, metadata={"Title": title, "Subject": title, "Creator": "sweep.report"}) as pdf:
        for fig in pages:
            pdf.savefig(fig)
