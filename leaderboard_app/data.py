"""The leaderboard's numbers: load a results folder, filter it, aggregate it. Plain pandas, no Streamlit.

Scores are aggregated the way the samples were drawn: first the mean over the questions of each
sample, then the mean of those sample means, with a seeded percentile bootstrap over the samples for
the 95% interval. Rows that carry an ``error`` are left out of every score and cost but counted.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kvbench import results
from kvbench.results import COLUMNS, Loaded, bootstrap_ci, part_files, sample_means
from kvbench.results.stats import SAMPLE_KEY

BASELINE = "full"
MIB = 1024 * 1024
NO_RATIO = -1.0  # stands in for a missing target ratio while grouping (NaN keys do not join)


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


def variants(frame: pd.DataFrame) -> pd.Series:
    """The method's name, plus the settings that tell its configurations apart when it has several.

    ``snapkv`` run once with window 64 and once with window 32 becomes ``snapkv (window_size=32)`` and
    ``snapkv (window_size=64)``: two lines on the leaderboard, not one average. Seeds are repeats, not
    settings, so they are pooled.
    """
    if frame.empty:
        return pd.Series([], dtype=object, index=frame.index)
    settings = frame[["method", "method_config", "allocation"]].astype(object).where(
        frame[["method", "method_config", "allocation"]].notna(), None
    )
    labels = pd.Series(frame["method"].astype(str).to_numpy(), index=frame.index, dtype=object)
    for method, rows in settings.groupby("method", sort=False):
        distinct = rows.drop_duplicates(["method_config", "allocation"])
        if len(distinct) < 2:
            continue
        parsed = {}
        for cfg, alloc in zip(distinct["method_config"], distinct["allocation"]):
            try:
                values = json.loads(cfg) if cfg else {}
            except (TypeError, ValueError):
                values = {"config": cfg}
            if not isinstance(values, dict):
                values = {"config": values}
            values.pop("seed", None)
            values["allocation"] = alloc
            parsed[(cfg, alloc)] = values
        keys = sorted({k for v in parsed.values() for k in v})
        differing = [k for k in keys if len({json.dumps(v.get(k), sort_keys=True) for v in parsed.values()}) > 1]
        for (cfg, alloc), values in parsed.items():
            if not differing:
                continue
            suffix = ", ".join(f"{k}={values.get(k)}" for k in differing)
            same = (rows["method_config"] == cfg) if cfg is not None else rows["method_config"].isna()
            same &= (rows["allocation"] == alloc) if alloc is not None else rows["allocation"].isna()
            labels.loc[rows.index[same.to_numpy()]] = f"{method} ({suffix})"
    return labels


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


def _group_seed(seed: int, key) -> list[int]:
    """A seed per group, so a group's interval does not depend on which other groups are shown."""
    return [seed, zlib.crc32(repr(key).encode())]


def leaderboard(frame: pd.DataFrame, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per (method variant, target ratio): score with its interval, gap to full and costs."""
    by = ["variant", "method", "target_ratio"]
    columns = [
        *by, "score", "ci_low", "ci_high", "gap_to_full", "measured_ratio", "token_match",
        "kv_bytes_full", "kv_bytes_kept", "kv_bytes_physical", "peak_mem_bytes", "prefill_scoring_s",
        "decode_s", "context_tokens", "samples", "rows", "errors", "commands",
    ]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame = frame.copy()
    frame["target_ratio"] = frame["target_ratio"].fillna(NO_RATIO)  # threshold methods: a group of their own
    frame["prefill_scoring_s"] = frame["prefill_s"] + frame["scoring_s"].fillna(0.0)
    valid = frame[frame["error"].isna()]

    costs = valid.groupby(by, dropna=False).agg(
        measured_ratio=("measured_ratio", "mean"),
        token_match=("token_match", "mean"),
        kv_bytes_full=("kv_bytes_full", "mean"),
        kv_bytes_kept=("kv_bytes_kept", "mean"),
        kv_bytes_physical=("kv_bytes_physical", "mean"),
        peak_mem_bytes=("peak_mem_bytes", "mean"),
        prefill_scoring_s=("prefill_scoring_s", "mean"),
        decode_s=("decode_s", "mean"),
        context_tokens=("context_tokens", "mean"),
        rows=("score", "size"),
    )
    counts = frame.groupby(by, dropna=False).agg(
        errors=("error", lambda s: int(s.notna().sum())),
        commands=("command", lambda s: "\n".join(sorted({c for c in s.dropna() if c}))),
    )
    per_sample = sample_means(frame, by)
    stats = []
    for key, group in per_sample.groupby(by, dropna=False, sort=False):
        low, high = bootstrap_ci(group["score"].to_numpy(), n_boot, level, _group_seed(seed, key))
        stats.append((*key, group["score"].mean(), low, high, len(group)))
    scores = pd.DataFrame(stats, columns=[*by, "score", "ci_low", "ci_high", "samples"]).set_index(by)

    table = counts.join(costs, how="left").join(scores, how="left").reset_index()
    table["rows"] = table["rows"].fillna(0).astype(int)
    table["samples"] = table["samples"].fillna(0).astype(int)
    full = table.loc[table["method"] == BASELINE, "score"]
    full_score = full.iloc[0] if len(full) == 1 else (
        sample_means(frame[frame["method"] == BASELINE], ["method"])["score"].mean() if len(full) else np.nan
    )
    table["gap_to_full"] = table["score"] - full_score
    table["target_ratio"] = table["target_ratio"].where(table["target_ratio"] != NO_RATIO)
    table["_order"] = (table["method"] != BASELINE).astype(int)
    table = table.sort_values(["_order", "target_ratio", "score", "variant"], ascending=[True, True, False, True])
    return table.drop(columns="_order")[columns].reset_index(drop=True)


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


DISPLAY = {  # leaderboard column → header shown (bytes become MiB)
    "variant": "method",
    "target_ratio": "ratio",
    "score": "score",
    "ci_low": "95% CI low",
    "ci_high": "95% CI high",
    "gap_to_full": "gap to full",
    "measured_ratio": "measured ratio",
    "token_match": "token match",
    "samples": "samples",
    "errors": "errors",
    "kv_bytes_kept": "KV kept (MiB)",
    "kv_bytes_physical": "KV physical (MiB)",
    "peak_mem_bytes": "peak mem (MiB)",
    "prefill_scoring_s": "prefill+scoring (s)",
    "decode_s": "decode (s)",
    "rows": "rows",
}


def display_table(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as shown: readable headers, bytes in MiB."""
    shown = board[list(DISPLAY)].copy()
    for col in ("kv_bytes_kept", "kv_bytes_physical", "peak_mem_bytes"):
        shown[col] = shown[col] / MIB
    return shown.rename(columns=DISPLAY)


__all__ = [
    "BASELINE", "COLUMNS", "Filters", "Loaded", "bootstrap_ci", "display_table", "errors", "leaderboard",
    "load", "pareto_front", "part_files", "runs", "sample_means", "select", "signature", "subtask_matrix",
    "variants",
]
