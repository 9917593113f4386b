"""``kvbench report RESULTS``: a static report of a results folder, for sharing and PR comments.

The same table as the leaderboard (:mod:`kvbench.results.table`: macro score over subtasks with its
interval and the samples behind it, memory saved, failed rows marked), one section per (model, task,
query mode), each with its per-subtask scores and the notes on memory. ``--format md`` is GitHub
Markdown (tables only); ``--format html`` is one self-contained page that also draws the
leaderboard's key plots — score against memory saved, score against entries evicted — with
plotly.js inlined, so it opens offline. A section whose rows carry a needle depth (``--task needle``)
also shows score over needle depth × context length for every (method, ratio): a heatmap each in
HTML, one table per length (a row per method and ratio, a column per depth) in Markdown.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kvbench.errors import UsageError
from kvbench.leaderboard_app import data
from kvbench.results.table import (depth_cells, depth_matrix, markdown, notes, per_subtask, ratio_label, score_text,
                                   text_rows)

QUERY_MODES = {False: "query-agnostic", True: "query-aware"}
ABOUT = ("Score: the task's metric (0–100), averaged over each sample's questions, then over the samples "
         "of each subtask, then the unweighted mean over subtasks, with a 95% bootstrap interval over "
         "samples (stratified by subtask) and n = the samples behind it; ⚠ marks cells with failed rows, "
         "which are left out. Memory saved: 1 − physical KV bytes / the full cache's (below 0: the method "
         "holds more than the full cache). Measured ratio: the fraction of KV entries evicted.")


@dataclass
class Section:
    model: str
    task: str
    query_aware: bool
    rows: pd.DataFrame  # the selection, `full` baseline included
    board: pd.DataFrame  # kvbench.results.table.leaderboard
    subtasks: pd.DataFrame  # kvbench.results.table.per_subtask
    notes: list[str]
    # (method variant, ratio) → score over needle depth × length (kvbench.results.table.depth_matrix)
    depths: dict[tuple[str, float | None], pd.DataFrame] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.model} · {self.task} · {QUERY_MODES[self.query_aware]}"

    def facts(self) -> str:
        samples = self.rows.drop_duplicates(data.SAMPLE_KEY)
        names = sorted(self.rows["subtask"].dropna().unique())
        lengths = sorted(int(v) for v in self.rows["requested_length"].dropna().unique())
        return (f"{len(samples)} samples, {len(self.rows)} rows; subtasks: {', '.join(names)}"
                + (f"; context length {', '.join(map(str, lengths))} tokens" if lengths else ""))


@dataclass
class Report:
    folder: Path
    files: list[str]
    skipped: list[tuple[str, str]]
    sections: list[Section] = field(default_factory=list)


def build(folder: Path) -> Report:
    """Read every part file under ``folder`` and aggregate one section per (model, task, query mode)."""
    folder = Path(folder)
    if not folder.exists():
        raise UsageError(f"results folder {folder} does not exist")
    loaded = data.load(folder)
    frame = loaded.frame
    if frame.empty:
        why = "; ".join(f"{name}: {reason}" for name, reason in loaded.skipped) or "no part files"
        raise UsageError(f"{folder} holds no readable results ({why})")
    report = Report(folder, loaded.files, loaded.skipped)
    evicting = frame[frame["method"] != data.BASELINE]
    keys = evicting if len(evicting) else frame
    for (model, task, aware), _ in keys.groupby(["model", "task", "query_aware"], sort=True):
        rows = data.select(frame, data.Filters(model=model, task=task, query_aware=bool(aware)))
        board = data.leaderboard(rows)
        depths = {cell: depth_matrix(rows, *cell) for cell in depth_cells(rows)}
        report.sections.append(Section(model, task, bool(aware), rows, board, per_subtask(rows), notes(board), depths))
    return report


def _subtask_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Method × ratio rows, one column per subtask, each cell its score, interval, n and failed rows."""
    names = sorted(table["subtask"].dropna().unique())
    header = ["method", "ratio", *names]
    rows = []
    for (variant, ratio), cells in table.groupby(["variant", "target_ratio"], sort=False, dropna=False):
        by_name = {c.subtask: score_text(c.score, c.ci_low, c.ci_high, c.samples, c.errors)
                   for c in cells.itertuples(index=False)}
        rows.append([variant, ratio_label(ratio), *[by_name.get(n, "—") for n in names]])
    return header, rows


def _depth_rows(depths: dict[tuple[str, float | None], pd.DataFrame]) -> list[tuple[int, list[str], list[list[str]]]]:
    """Per requested length: (length, header, rows), a row per (method, ratio), a column per needle depth."""
    lengths = sorted({int(n) for m in depths.values() for n in m.columns})
    steps = sorted({d for m in depths.values() for d in m.index})
    out = []
    for length in lengths:
        rows = []
        for (variant, ratio), matrix in depths.items():
            column = matrix[length] if length in matrix.columns else pd.Series(dtype=float)
            rows.append([variant, ratio_label(ratio),
                         *["—" if pd.isna(column.get(d)) else f"{column[d]:.0f}" for d in steps]])
        out.append((length, ["method", "ratio", *[f"{d:g}%" for d in steps]], rows))
    return out


def _header_lines(report: Report) -> list[str]:
    rows = sum(len(s.rows) for s in report.sections)
    lines = [f"{len(report.files)} part file(s) read, {rows} rows in {len(report.sections)} section(s)."]
    if report.skipped:
        lines.append(f"Skipped {len(report.skipped)} file(s): "
                     + "; ".join(f"{name}: {why}" for name, why in report.skipped))
    return lines


def to_markdown(report: Report) -> str:
    lines = [f"## kvbench report: `{report.folder}`", "", *_header_lines(report), "", ABOUT, ""]
    for section in report.sections:
        lines += [f"### {section.title}", "", section.facts(), "", markdown(*text_rows(section.board)), ""]
        lines += [f"- {note}" for note in section.notes]
        lines += ["", "<details><summary>Per subtask</summary>", "", markdown(*_subtask_rows(section.subtasks)),
                  "", "</details>", ""]
        for length, header, rows in _depth_rows(section.depths):
            lines += [f"**Needle in a haystack at {length} tokens**: score by the needle's depth (the share of the "
                      "haystack before it)", "", markdown(header, rows), ""]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]], css_class: str) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; }
.note { background: #fff6dd; padding: 4px 8px; margin: 4px 0; }
.plots { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
"""


def to_html(report: Report) -> str:
    """One page, plotly.js inlined once, so the file opens without a network."""
    try:
        from plotly.offline import get_plotlyjs

        from kvbench.leaderboard_app import charts
    except ImportError as err:
        raise UsageError(f"--format html needs plotly ({err}): pip install 'kvbench[leaderboard]'") from None
    esc = html.escape
    parts = [f"<h1>kvbench report: <code>{esc(str(report.folder))}</code></h1>",
             *[f"<p>{esc(line)}</p>" for line in _header_lines(report)], f"<p>{esc(ABOUT)}</p>"]
    for index, section in enumerate(report.sections):
        figures = [charts.score_vs_memory(section.board), charts.score_vs_ratio(section.board)]
        plots = "".join(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{index}-{n}")
                        for n, fig in enumerate(figures))
        parts += [
            f'<section class="report-section"><h2>{esc(section.title)}</h2><p>{esc(section.facts())}</p>',
            _html_table(*text_rows(section.board), "leaderboard"),
            *[f'<p class="note">{esc(note)}</p>' for note in section.notes],
            f'<div class="plots">{plots}</div>',
            "<h3>Per subtask</h3>", _html_table(*_subtask_rows(section.subtasks), "per-subtask"),
        ]
        if section.depths:
            maps = "".join(charts.depth_heatmap(m, *cell).to_html(full_html=False, include_plotlyjs=False,
                                                                   div_id=f"needle-{index}-{n}")
                           for n, (cell, m) in enumerate(section.depths.items()))
            parts += ["<h3>Needle depth × context length</h3>", f'<div class="plots needle">{maps}</div>']
        parts.append("</section>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>kvbench report</title>"
            f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def render(folder: Path, fmt: str = "md") -> str:
    report = build(folder)
    return to_html(report) if fmt == "html" else to_markdown(report)
