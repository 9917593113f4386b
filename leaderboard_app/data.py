"""The leaderboard's numbers: load a results folder, filter it, aggregate it. Plain pandas, no Streamlit.

The table itself is :mod:`kvbench.results.table`'s (shared with ``kvbench report``): the mean over
the questions of each sample, then per subtask, then the macro mean over subtasks, each with a seeded
bootstrap interval; memory saved (``1 − kv_bytes_physical / kv_bytes_full``) is the primary cost.
Rows that carry an ``error`` are left out of every score and cost but counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kvbench import results
from kvbench.results import COLUMNS, Loaded, bootstrap_ci, part_files, sample_means
from kvbench.results.stats import SAMPLE_KEY
from kvbench.results.table import (BASELINE, DISPLAY, MIB, NO_RATIO, depth_cells, depth_matrix, display_table,
                                   leaderboard, notes, per_subtask, ratio_label, variants)


def signature(folder: Path) -> tuple:
    """What the cached load depends on: each file's name, size and modification time."""
    out = []
    for p in part_files(folder):
        try:
            stat = p.stat()
        except OSError:
            continue
        out.append((str(p), stat.st_size, stat.st_mtime_ns))
    return tuple(out)


def load(folder: Path) -> Loaded:
    """Every readable part file under ``folder`` as one frame with a ``variant`` column; unreadable or
    foreign files are listed as skipped (``kvbench.results.load``)."""
    loaded = results.load(folder)
    frame = loaded.frame
    frame = frame[frame["method"].notna()].reset_index(drop=True)
    frame["query_aware"] = frame["query_aware"].fillna(False).astype(bool)
    frame["variant"] = variants(frame)
    return Loaded(frame, loaded.files, loaded.skipped)


@dataclass(frozen=True)
class Filters:
    """What the sidebar selects; None means everything."""

    model: str | None = None
    task: str | None = None
    subtasks: tuple[str, ...] | None = None
    lengths: tuple[int, ...] | None = None  # requested_length
    query_aware: bool | None = None
    methods: tuple[str, ...] | None = None  # the `full` baseline is always kept


def select(frame: pd.DataFrame, filters: Filters) -> pd.DataFrame:
    """The rows the filters choose, and always the ``full`` baseline rows of the same selection.

    The full cache evicts nothing, so whether the question was compressed with the context changes
    nothing for it: when the chosen query mode has no baseline rows, those of the other mode are used.
    """
    keep = pd.Series(True, index=frame.index)
    if filters.model is not None:
        keep &= frame["model"] == filters.model
    if filters.task is not None:
        keep &= frame["task"] == filters.task
    if filters.subtasks is not None:
        keep &= frame["subtask"].isin(list(filters.subtasks))
    if filters.lengths is not None:
        keep &= frame["requested_length"].isin(list(filters.lengths))
    is_full = frame["method"] == BASELINE
    mode = pd.Series(True, index=frame.index)
    if filters.query_aware is not None:
        mode = frame["query_aware"] == filters.query_aware
    if filters.methods is not None:
        keep &= frame["method"].isin(list(filters.methods)) | is_full
    baseline = keep & is_full & mode
    if not baseline.any():
        baseline = keep & is_full
    return frame[(keep & mode & ~is_full) | baseline].reset_index(drop=True)


def subtask_matrix(frame: pd.DataFrame, ratio: float) -> pd.DataFrame:
    """Mean score per (method variant × subtask) at one target ratio, the ``full`` baseline on top."""
    chosen = frame[(frame["target_ratio"] == ratio) | (frame["method"] == BASELINE)]
    if chosen.empty:
        return pd.DataFrame()
    per_sample = sample_means(chosen, ["variant", "subtask"])
    matrix = per_sample.groupby(["variant", "subtask"])["score"].mean().unstack("subtask")
    order = sorted(matrix.index, key=lambda v: (v != BASELINE, -np.nan_to_num(matrix.loc[v].mean(), nan=-1), v))
    return matrix.loc[order, sorted(matrix.columns)]


def pareto_front(cost, benefit) -> np.ndarray:
    """Which points no other point beats: none is at most as costly and strictly better, or cheaper and as good."""
    cost, benefit = np.asarray(cost, dtype=float), np.asarray(benefit, dtype=float)
    ok = ~(np.isnan(cost) | np.isnan(benefit))
    front = np.zeros(len(cost), dtype=bool)
    best = -np.inf
    for i in sorted(np.flatnonzero(ok), key=lambda i: (cost[i], -benefit[i])):
        if benefit[i] > best:
            front[i] = True
            best = benefit[i]
    return front


def runs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run (part file writer): where and how it ran, and the command that reproduces it."""
    if frame.empty:
        return pd.DataFrame()

    def joined(values) -> str:
        return ", ".join(sorted({str(v) for v in values.dropna()}))

    table = frame.groupby("run_id", dropna=False).agg(
        command=("command", joined),
        created_at=("created_at", "min"),
        model=("model", joined),
        task=("task", joined),
        device=("device", joined),
        dtype=("dtype", joined),
        methods=("method", joined),
        ratios=("target_ratio", lambda s: ", ".join(f"{v:g}" for v in sorted(s.dropna().unique()))),
        rows=("method", "size"),
        errors=("error", lambda s: int(s.notna().sum())),
        kvbench=("kvbench_version", joined),
        torch=("torch_version", joined),
        transformers=("transformers_version", joined),
        git_sha=("git_sha", joined),
    )
    return table.reset_index().sort_values("created_at", ascending=False, na_position="last")


def errors(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows that failed, with their message."""
    cols = ["run_id", "method", "target_ratio", "subtask", "sample_id", "question_id", "error"]
    return frame.loc[frame["error"].notna(), cols].reset_index(drop=True)


__all__ = [
    "BASELINE", "COLUMNS", "DISPLAY", "Filters", "Loaded", "MIB", "NO_RATIO", "SAMPLE_KEY", "bootstrap_ci",
    "depth_cells", "depth_matrix", "display_table", "errors", "leaderboard", "load", "notes", "pareto_front",
    "part_files", "per_subtask", "ratio_label", "runs", "sample_means", "select", "signature", "subtask_matrix",
    "variants",
]
