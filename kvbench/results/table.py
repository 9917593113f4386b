"""The leaderboard table, built once for the Streamlit leaderboard, ``kvbench report`` and anything
else that ranks methods: one row per (method variant, target ratio).

Scores follow :mod:`kvbench.results.stats`: questions averaged per sample, samples per subtask, then
the macro mean over subtasks, each with its seeded bootstrap interval. Every cell says how many
samples stand behind it and how many rows failed; a cell with failed rows keeps its score over the
valid samples and is marked (:func:`score_text`), and a cell with a subtask whose every row failed
gets no score at all.

The primary cost axis is memory: ``memory_saving = 1 − kv_bytes_physical / kv_bytes_full``, the
bytes the cache really holds (padding, masks, method state, residual checkpoints) against the full
cache's. A method holding more than the full cache has a negative saving. ``measured_ratio`` (the
fraction of entries evicted) is the secondary view.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from kvbench.results.stats import macro_scores, sample_means, subtask_scores

BASELINE = "full"
MIB = 1024 * 1024
NO_RATIO = -1.0  # stands in for a missing target ratio while grouping (threshold methods)
CELL = ["variant", "method", "target_ratio"]

BOARD_COLUMNS = [
    *CELL, "memory_saving", "score", "ci_low", "ci_high", "gap_to_full", "measured_ratio", "token_match",
    "kv_bytes_full", "kv_bytes_kept", "kv_bytes_physical", "peak_mem_bytes", "prefill_scoring_s", "decode_s",
    "context_tokens", "samples", "subtasks", "empty_subtasks", "rows", "errors", "commands",
]


# Variants are told apart within what one leaderboard table compares (one model's rows on one task):
# a config that differs only between models (Gemma 3's compressed layers) does not relabel the other's.
COMPARED_TOGETHER = ("model", "task")
# Run settings that change a method's results, told apart like its config when they differ.
RUN_SETTINGS = ("dtype",)


def variants(frame: pd.DataFrame) -> pd.Series:
    """The method's name, plus the settings that tell its configurations apart when it has several.

    ``snapkv`` run once with window 64 and once with window 32 becomes ``snapkv (window_size=32)`` and
    ``snapkv (window_size=64)``: two lines on the leaderboard, not one average. A method run in two
    dtypes on the same model and task becomes two lines too (``dtype=bfloat16``, ``dtype=float32``).
    Seeds are repeats, not settings, so they are pooled. Labels are chosen within each model and task.
    """
    if frame.empty:
        return pd.Series([], dtype=object, index=frame.index)
    together = [c for c in COMPARED_TOGETHER if c in frame]
    if not together:
        return _variants_within(frame)
    parts = [_variants_within(rows) for _, rows in frame.groupby(together, dropna=False, sort=False)]
    return pd.concat(parts).reindex(frame.index)


def _variants_within(frame: pd.DataFrame) -> pd.Series:
    """:func:`variants` over rows that are compared together."""
    columns = ["method", "method_config", "allocation", *(c for c in RUN_SETTINGS if c in frame)]
    settings = frame[columns].astype(object).where(frame[columns].notna(), None)
    labels = pd.Series(frame["method"].astype(str).to_numpy(), index=frame.index, dtype=object)
    for method, rows in settings.groupby("method", sort=False):
        distinct = rows.drop_duplicates(columns[1:])
        if len(distinct) < 2:
            continue
        parsed = {}
        for combo in distinct[columns[1:]].itertuples(index=False, name=None):
            cfg, alloc, run = combo[0], combo[1], combo[2:]
            try:
                values = json.loads(cfg) if cfg else {}
            except (TypeError, ValueError):
                values = {"config": cfg}
            if not isinstance(values, dict):
                values = {"config": values}
            values.pop("seed", None)
            values["allocation"] = alloc
            values.update(zip(columns[3:], run))
            parsed[combo] = values
        keys = sorted({k for v in parsed.values() for k in v})
        differing = [k for k in keys if len({json.dumps(v.get(k), sort_keys=True) for v in parsed.values()}) > 1]
        if not differing:
            continue
        for combo, values in parsed.items():
            suffix = ", ".join(f"{k}={values.get(k)}" for k in differing)
            same = pd.Series(True, index=rows.index)
            for column, value in zip(columns[1:], combo):
                same &= (rows[column] == value) if value is not None else rows[column].isna()
            labels.loc[rows.index[same.to_numpy()]] = f"{method} ({suffix})"
    return labels


def _prepared(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    if "variant" not in frame:
        frame["variant"] = variants(frame)
    frame["target_ratio"] = frame["target_ratio"].fillna(NO_RATIO)  # threshold methods: a group of their own
    frame["prefill_scoring_s"] = frame["prefill_s"] + frame["scoring_s"].fillna(0.0)
    full = frame["kv_bytes_full"].where(frame["kv_bytes_full"] > 0)
    frame["memory_saving"] = 1.0 - frame["kv_bytes_physical"] / full
    return frame


def leaderboard(frame: pd.DataFrame, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per (method variant, target ratio): the macro score over subtasks with its interval,
    the gap to ``full``, the memory saving and the other costs (means over rows without an error)."""
    if frame.empty:
        return pd.DataFrame(columns=BOARD_COLUMNS)
    frame = _prepared(frame)
    valid = frame[frame["error"].isna()]
    costs = valid.groupby(CELL, dropna=False).agg(
        memory_saving=("memory_saving", "mean"),
        measured_ratio=("measured_ratio", "mean"),
        token_match=("token_match", "mean"),
        kv_bytes_full=("kv_bytes_full", "mean"),
        kv_bytes_kept=("kv_bytes_kept", "mean"),
        kv_bytes_physical=("kv_bytes_physical", "mean"),
        peak_mem_bytes=("peak_mem_bytes", "mean"),
        prefill_scoring_s=("prefill_scoring_s", "mean"),
        decode_s=("decode_s", "mean"),
        context_tokens=("context_tokens", "mean"),
    )
    commands = frame.groupby(CELL, dropna=False).agg(
        commands=("command", lambda s: "\n".join(sorted({c for c in s.dropna() if c}))))
    scores = macro_scores(frame, CELL, n_boot, level, seed).set_index(CELL)
    table = scores.join(commands, how="left").join(costs, how="left").reset_index()
    full = table.loc[table["method"] == BASELINE, "score"]
    table["gap_to_full"] = table["score"] - (full.iloc[0] if len(full) == 1 else np.nan)
    table["target_ratio"] = table["target_ratio"].where(table["target_ratio"] != NO_RATIO)
    table["_order"] = (table["method"] != BASELINE).astype(int)
    table = table.sort_values(["_order", "target_ratio", "score", "variant"], ascending=[True, True, False, True])
    return table.drop(columns="_order")[BOARD_COLUMNS].reset_index(drop=True)


def per_subtask(frame: pd.DataFrame, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per (method variant, target ratio, task, subtask): the subtask's score with its interval,
    samples, valid rows and failed rows — what each leaderboard score is the macro mean of."""
    if frame.empty:
        return pd.DataFrame(columns=[*CELL, "task", "subtask", "score", "ci_low", "ci_high", "samples", "rows",
                                     "errors"])
    table = subtask_scores(_prepared(frame), CELL, n_boot, level, seed)
    table["target_ratio"] = table["target_ratio"].where(table["target_ratio"] != NO_RATIO)
    table["_order"] = (table["method"] != BASELINE).astype(int)
    table = table.sort_values(["_order", "target_ratio", "variant", "task", "subtask"])
    return table.drop(columns="_order").reset_index(drop=True)


def depth_cells(frame: pd.DataFrame) -> list[tuple[str, float | None]]:
    """The (method variant, target ratio) pairs with needle-depth rows: ``full`` first, then by name and ratio.
    A threshold method's ratio is None."""
    rows = frame[frame["needle_depth"].notna()]
    if rows.empty:
        return []
    pairs = rows.assign(variant=rows["variant"] if "variant" in rows else variants(rows),
                        target_ratio=rows["target_ratio"].fillna(NO_RATIO))[["variant", "target_ratio"]]
    pairs = sorted(set(map(tuple, pairs.to_numpy())), key=lambda p: (p[0] != BASELINE, p[0], p[1]))
    return [(v, None if r == NO_RATIO else float(r)) for v, r in pairs]


def depth_matrix(frame: pd.DataFrame, variant: str, ratio: float | None) -> pd.DataFrame:
    """Score (0–100) over needle depth (index, percent, ascending) × requested context length (columns)
    for one method variant at one target ratio (None: a threshold method).

    Each cell is scored as the leaderboard scores: the questions of a sample averaged, then the
    samples of each subtask, then the unweighted mean over subtasks; failed rows are left out, and a
    cell without a valid sample is NaN. Rows without a needle depth (other tasks) are ignored.
    """
    labels = frame["variant"] if "variant" in frame else variants(frame)
    wanted = NO_RATIO if ratio is None else ratio
    rows = frame[(labels == variant) & (frame["target_ratio"].fillna(NO_RATIO) == wanted)
                 & frame["needle_depth"].notna()]
    cell = ["needle_depth", "requested_length"]
    per_sample = sample_means(rows, cell)
    per_subtask = per_sample.groupby([*cell, "subtask"])["score"].mean()
    matrix = per_subtask.groupby(cell).mean().unstack("requested_length") if len(per_subtask) else pd.DataFrame()
    depths = pd.Index(sorted(rows["needle_depth"].unique()), name="needle_depth")
    lengths = pd.Index(sorted(rows["requested_length"].dropna().unique()), name="requested_length")
    return matrix.reindex(index=depths, columns=lengths).astype(float)  # failed cells stay, as NaN


def ratio_label(value) -> str:
    return "threshold" if pd.isna(value) else f"{value:g}"


def score_text(score: float, low: float, high: float, samples: int, errors: int, empty: int = 0) -> str:
    """A score as a report prints it: value, interval, samples behind it, and a mark when rows failed."""
    if pd.isna(score):
        text = "—"
        if empty:
            text += f" ({empty} subtask{'s' if empty > 1 else ''} without a valid sample)"
    else:
        text = f"{score:.1f} [{low:.1f}, {high:.1f}]"
    text += f" n={samples}"
    if errors:
        text += f" ⚠ {errors} failed row{'s' if errors > 1 else ''}"
    return text


def notes(board: pd.DataFrame) -> list[str]:
    """What a reader must know about the cells' memory: methods that answer exactly as the full cache
    but hold more bytes than it (kvdirect on GQA models), and cells that save no memory."""
    out, none_saved = [], []
    evicting = board[(board["method"] != BASELINE) & board["memory_saving"].notna()]
    full_decode = board.loc[board["method"] == BASELINE, "decode_s"]
    for variant, rows in evicting.groupby("variant", sort=True):
        # costs memory: 1% or more above the full cache (kvdirect's residuals), not the packed layout's
        # few offset bytes on a cell that evicted nothing (simlayerkv on a context its windows cover)
        costly = rows["memory_saving"] <= -0.01
        exact = rows["token_match"].notna().all() and (rows["token_match"] == 1.0).all()
        if costly.all() and exact:
            held = 1 - rows["memory_saving"]
            time = ""
            if len(full_decode) == 1 and full_decode.iloc[0] > 0:
                factor = rows["decode_s"] / full_decode.iloc[0]
                time = f" and {factor.min():.1f}–{factor.max():.1f}× the full cache's decoding time"
            out.append(f"{variant}: exact (token match 1.000 at every ratio), costs memory and time on this "
                       f"model: {held.min():.2f}–{held.max():.2f}× the full cache's KV bytes{time}")
            continue
        none_saved += [f"{variant} @ {ratio_label(r)}" for r in rows.loc[rows["memory_saving"] <= 0, "target_ratio"]]
    if none_saved:
        out.append("Saves no memory (physical KV bytes are not below the full cache's): " + ", ".join(none_saved))
    return out


DISPLAY = {  # leaderboard column → header shown (bytes become MiB)
    "variant": "method",
    "target_ratio": "ratio",
    "memory_saving": "memory saved",
    "score": "score",
    "ci_low": "95% CI low",
    "ci_high": "95% CI high",
    "samples": "samples",
    "errors": "errors",
    "gap_to_full": "gap to full",
    "measured_ratio": "measured ratio",
    "token_match": "token match",
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


def text_rows(board: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The leaderboard as text cells (Markdown and HTML reports): the score cell carries its interval,
    samples and failed rows."""
    header = ["method", "ratio", "memory saved", "score [95% CI] n", "gap to full", "measured ratio",
              "token match", "KV physical (MiB)", "prefill+scoring (s)", "decode (s)"]

    def number(value, fmt: str) -> str:
        return "—" if pd.isna(value) else format(value, fmt)

    rows = []
    for r in board.itertuples(index=False):
        rows.append([
            r.variant, ratio_label(r.target_ratio), number(r.memory_saving, "+.1%"),
            score_text(r.score, r.ci_low, r.ci_high, r.samples, r.errors, r.empty_subtasks),
            number(r.gap_to_full, "+.1f"), number(r.measured_ratio, ".3f"), number(r.token_match, ".3f"),
            number(r.kv_bytes_physical / MIB if pd.notna(r.kv_bytes_physical) else np.nan, ".2f"),
            number(r.prefill_scoring_s, ".3f"), number(r.decode_s, ".3f"),
        ])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table (``|`` in cells escaped)."""
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
