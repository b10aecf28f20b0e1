"""The multi-page PDF: a title page, every figure (vector), and the results table."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

A4_LANDSCAPE = (11.69, 8.27)
ROWS_PER_PAGE = 22
STATUS_CHARS = 48


def table_pages(table: pd.DataFrame) -> int:
    """How many pages ``table`` takes in the PDF."""
    return max(1, math.ceil(len(table) / ROWS_PER_PAGE))


def title_page(title: str, fields: list[tuple[str, str]], notes: list[str]) -> Figure:
    """Key facts of the sweep, then the notes, spread over the page at a reading size (12 pt facts);
    the notes are cut with a pointer to results.md when they overflow."""
    fig = Figure(figsize=A4_LANDSCAPE)
    fig.text(0.05, 0.94, title, fontsize=20, weight="bold", va="top")
    lines = []  # (key or "", text, monospace)
    for key, value in fields:
        for k, line in enumerate((textwrap.wrap(str(value), 95) or ["—"])[:2]):
            lines.append((key if k == 0 else "", line, key in ("git commit", "parent run")))
    note_lines = []
    for n in notes:
        note_lines += [("• " if k == 0 else "   ") + line for k, line in enumerate(textwrap.wrap(n, 125))]
    # 0.86 .. 0.04 of the page: facts first, notes under them; the line pitch shrinks only when it must
    room = 0.82 - (0.05 if note_lines else 0.0)
    pitch = min(0.045, room / (len(lines) + 0.8 * len(note_lines) + (1 if note_lines else 0)))
    size = min(12.5, max(9.0, pitch * A4_LANDSCAPE[1] * 72 / 1.45))
    y = 0.86
    for key, line, mono in lines:
        if key:
            fig.text(0.05, y, key, fontsize=size, weight="bold", va="top")
        fig.text(0.23, y, line, fontsize=size, va="top", family="monospace" if mono else None)
        y -= pitch
    if note_lines:
        y -= 0.02
        fig.text(0.05, y, "Notes", fontsize=size, weight="bold", va="top")
        y -= pitch
        npitch = max(0.8 * pitch, 0.022)  # below the smallest pitch the rest goes to results.md
        fit = max(1, int((y - 0.01) / npitch))
        if len(note_lines) > fit:
            note_lines = note_lines[:fit - 1] + ["… more notes in results.md"]
        for line in note_lines:
            fig.text(0.06, y, line, fontsize=max(8.5, size - 1.5), va="top")
            y -= npitch
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
            # rows of one height on every page, a full page reaching the bottom margin
            h = (len(chunk) + 1) / (ROWS_PER_PAGE + 1)
            tab = ax.table(cellText=cells, colLabels=cols, cellLoc="left", bbox=(0.0, 1.0 - h, 1.0, h),
                           colWidths=[w / total for w in width])
            tab.auto_set_font_size(False)
            # as large as the widest row allows across the page (about 0.55 em per character), 7..10.5 pt
            fontsize = max(7.0, min(10.5, 0.94 * A4_LANDSCAPE[0] * 72 / (0.56 * total)))
            tab.set_fontsize(fontsize)
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
