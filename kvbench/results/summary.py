"""The end-of-run summary: one line per (method, ratio) cell that a newcomer can read without the
leaderboard — score with its 95% interval, the gap to the full cache paired per sample with its
interval, token match, measured ratio, KV bytes (MiB and % of the full cache's), peak memory and
where the time went — as a plain aligned table or as JSON.

It is a function of the rows only, so the same table comes out at the end of ``kvbench run`` and
from ``kvbench summary DIR`` on a folder written earlier. Means follow :mod:`kvbench.results.stats`:
questions averaged within a sample, samples within a subtask, then the unweighted mean over subtasks.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kvbench.results.stats import SAMPLE_KEY, macro_score, sample_means, stratified_ci

BASELINE = "full"
MIB = 2**20
# One table per block: rows of different models, tasks, lengths or query modes are not comparable.
BLOCK = ["model", "task", "requested_length", "query_aware"]
RESAMPLES = 1000


@dataclass
class Cell:
    """One (method spec, ratio) cell of a block; NaN where the rows do not say (e.g. no full baseline)."""

    model: str
    task: str
    requested_length: int | None
    query_aware: bool
    method: str
    method_spec: str
    target_ratio: float | None  # None: a threshold method, whose ratio is only measured
    score: float
    score_ci: tuple[float, float]
    gap_to_full: float  # score minus the full cache's on the same samples, macro over subtasks
    gap_ci: tuple[float, float]
    paired_samples: int  # samples that both this cell and the full cache answered
    token_match: float
    measured_ratio: float
    kv_bytes_physical: float  # mean per context
    kv_bytes_full: float
    kv_percent_of_full: float
    peak_mem_bytes: float  # mean per row
    prefill_s: float
    scoring_s: float
    decode_s: float
    samples: int
    subtasks: int
    rows: int
    errors: int


def _mean(series: pd.Series) -> float:
    values = pd.to_numeric(series, errors="coerce").dropna()
    return float(values.mean()) if len(values) else float("nan")


def _gap(cell: pd.DataFrame, full: pd.DataFrame, seed: int) -> tuple[float, tuple[float, float], int]:
    """Paired gap to full: per sample, this cell's mean score minus the full cache's on that sample;
    the macro mean over subtasks of those differences and its stratified bootstrap interval."""
    if full.empty:
        return float("nan"), (float("nan"), float("nan")), 0
    pair_key = [k for k in SAMPLE_KEY if k != "query_aware"]  # full evicts nothing: either mode pairs
    mine = sample_means(cell, [])
    base = sample_means(full, []).groupby(pair_key, dropna=False)["score"].mean().reset_index()
    paired = mine.merge(base, on=pair_key, suffixes=("", "_full"))
    if paired.empty:
        return float("nan"), (float("nan"), float("nan")), 0
    paired["diff"] = paired["score"] - paired["score_full"]
    strata = [g["diff"].to_numpy() for _, g in paired.groupby("subtask", sort=True)]
    gap = float(np.mean([s.mean() for s in strata]))
    return gap, stratified_ci(strata, RESAMPLES, 0.95, seed), len(paired)


def _macro_mean(frame: pd.DataFrame, column: str) -> float:
    """Mean over subtasks of the mean over samples (of the mean over questions), as scores are; no interval."""
    per_sample = sample_means(frame, ["subtask"], column)
    means = per_sample.groupby("subtask")[column].mean()
    return float(means.mean()) if len(means) else float("nan")


def cells(frame: pd.DataFrame, seed: int = 0) -> list[Cell]:
    """Every (block, method spec, target ratio) cell of ``frame`` (rows in the results schema)."""
    if frame.empty:
        return []
    frame = frame.copy()
    frame["method_spec"] = frame["method_spec"].fillna(frame["method"])
    out: list[Cell] = []
    for block, rows in frame.groupby(BLOCK, dropna=False, sort=True):
        model, task, length, query_aware = block
        fulls = frame[(frame["method"] == BASELINE) & (frame["model"] == model) & (frame["task"] == task)
                      & (frame["requested_length"].fillna(-1) == (-1 if pd.isna(length) else length))]
        same_mode = fulls[fulls["query_aware"] == query_aware]
        full = same_mode if not same_mode.empty else fulls
        keys = ["method_spec", "target_ratio"]
        order = rows.assign(_full=rows["method"] != BASELINE).groupby(keys, dropna=False, sort=False)
        for (spec, ratio), cell in sorted(order, key=lambda kv: (kv[1]["_full"].iloc[0], _ratio_key(kv[0][1]),
                                                                   kv[0][0])):
            cell = cell.drop(columns="_full")
            score = macro_score(cell, RESAMPLES, 0.95, seed)
            match = _macro_mean(cell, "token_match")
            valid = cell[cell["error"].isna()]
            gap, gap_ci, paired = ((float("nan"), (float("nan"), float("nan")), 0) if cell["method"].iloc[0] == BASELINE
                                   else _gap(cell, full, seed))
            physical, full_bytes = _mean(valid["kv_bytes_physical"]), _mean(valid["kv_bytes_full"])
            out.append(Cell(
                model=str(model), task=str(task), requested_length=None if pd.isna(length) else int(length),
                query_aware=bool(query_aware), method=str(cell["method"].iloc[0]), method_spec=str(spec),
                target_ratio=None if pd.isna(ratio) else float(ratio),
                score=score["score"], score_ci=(score["ci_low"], score["ci_high"]), gap_to_full=gap, gap_ci=gap_ci,
                paired_samples=paired, token_match=match, measured_ratio=_mean(valid["measured_ratio"]),
                kv_bytes_physical=physical, kv_bytes_full=full_bytes,
                kv_percent_of_full=100 * physical / full_bytes if full_bytes else float("nan"),
                peak_mem_bytes=_mean(valid["peak_mem_bytes"]), prefill_s=_mean(valid["prefill_s"]),
                scoring_s=_mean(valid["scoring_s"]), decode_s=_mean(valid["decode_s"]),
                samples=score["samples"], subtasks=score["subtasks"], rows=len(cell), errors=score["errors"],
            ))
    return out


def _ratio_key(ratio) -> float:
    return math.inf if ratio is None or pd.isna(ratio) else float(ratio)


def _num(value: float, spec: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


def _interval(value: float, ci: tuple[float, float], signed: bool = False) -> str:
    if not math.isfinite(value):
        return "—"
    sign = "+" if signed else ""
    if not all(math.isfinite(c) for c in ci):
        return format(value, f"{sign}.1f")
    return f"{value:{sign}.1f} [{ci[0]:{sign}.0f}, {ci[1]:{sign}.0f}]"  # a few samples: whole points suffice


HEADER = ("method", "ratio", "score [95% CI]", "gap to full [95% CI]", "tok match", "evicted", "KV MiB", "% full",
          "peak MiB", "prefill s", "scoring s", "decode s", "n", "err")
RIGHT = {1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13}  # numeric columns, right-aligned


LEGEND = """\
score: the task's metric (0-100), mean over samples, then over subtasks; gap to full: the score
  minus the full cache's, paired per sample; [95% CI]: bootstrap over samples
tok match: share of answer tokens equal to the full cache's; evicted: measured fraction of KV entries
KV MiB, % full: bytes allocated per context after eviction, and their share of the full cache's
peak MiB, prefill/scoring/decode s: mean per row; n: samples; err: rows that failed"""


def _cells_row(cell: Cell) -> tuple[str, ...]:
    return (
        cell.method_spec,
        "τ" if cell.target_ratio is None else format(cell.target_ratio, "g"),
        _interval(cell.score, cell.score_ci),
        "" if cell.method == BASELINE else _interval(cell.gap_to_full, cell.gap_ci, signed=True),
        _num(cell.token_match, ".3f"),
        _num(cell.measured_ratio, ".3f"),
        _num(cell.kv_bytes_physical / MIB, ".2f"),
        _num(cell.kv_percent_of_full, ".0f") + ("%" if math.isfinite(cell.kv_percent_of_full) else ""),
        _num(cell.peak_mem_bytes / MIB, ".1f"),
        _num(cell.prefill_s, ".2f"),
        _num(cell.scoring_s, ".2f"),
        _num(cell.decode_s, ".2f"),
        str(cell.samples),
        str(cell.errors),
    )


def _align(lines: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(text.rjust(w) if i in RIGHT else text.ljust(w) for i, (text, w) in
                      enumerate(zip(line, widths))).rstrip() for line in lines]


def render(found: list[Cell]) -> str:
    """The cells as plain aligned tables, one per block, with a heading that says what was run."""
    parts = []
    blocks: dict[tuple, list[Cell]] = {}
    for cell in found:
        blocks.setdefault((cell.model, cell.task, cell.requested_length, cell.query_aware), []).append(cell)
    for (model, task, length, query_aware), group in blocks.items():
        samples = max(c.samples for c in group)
        tokens = f" · {length} tokens" if length is not None else ""
        heading = (f"{model} · {task}{tokens} · {'query-aware' if query_aware else 'query-agnostic'} · "
                   f"{samples} samples")
        lines = _align([HEADER, *(_cells_row(c) for c in group)])
        rule = "─" * max(len(line) for line in lines)
        parts.append("\n".join([heading, lines[0], rule, *lines[1:]]))
    return "\n\n".join(parts + [LEGEND])


def errors_line(frame: pd.DataFrame) -> str | None:
    """How many rows failed and the first failure, when any did."""
    failed = frame[frame["error"].notna()] if "error" in frame else frame.iloc[0:0]
    if failed.empty:
        return None
    first = failed.iloc[0]
    return f"kvbench: {len(failed)} rows failed (first: {first['method']}: {first['error']})"


def where_line(rows: int, folder: Path, written: list[Path] | None = None) -> str:
    """Where the rows are (the part files just written, or the folder read) and the commands that
    show them again: this table, and the leaderboard."""
    place = f"wrote {rows} rows to {', '.join(map(str, written))}" if written else f"{rows} rows in {folder}"
    return (f"kvbench: {place} · this table again: kvbench summary {shlex.quote(str(folder))} · "
            f"leaderboard: kvbench leaderboard --results {shlex.quote(str(folder))}")


def _plain(value):
    """JSON has no NaN: missing numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def as_json(frame: pd.DataFrame, folder: Path, written: list[Path] | None = None, seed: int = 0) -> dict:
    """The machine-readable summary ``--json`` prints: the same cells, bytes in bytes, times in seconds."""
    found = cells(frame, seed)
    return {
        "rows": len(frame),
        "errors": int(frame["error"].notna().sum()) if len(frame) else 0,
        "part_files": [str(p) for p in written or []],
        "results": str(folder),
        "leaderboard": f"kvbench leaderboard --results {shlex.quote(str(folder))}",
        "cells": [{k: _plain(v) for k, v in asdict(c).items()} for c in found],
    }
