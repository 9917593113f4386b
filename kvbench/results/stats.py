"""The statistics every report shares: per-sample means, seeded bootstrap intervals, macro means.

Scores are aggregated the way benchmarks report them: the questions of a sample are averaged first
(a sample is the unit that was drawn), then the samples of a subtask, then — for a task with several
subtasks, as LongBench and RULER report — the unweighted (macro) mean over subtasks, so a subtask
with more samples does not weigh more. Intervals are percentile bootstraps over samples, stratified
by subtask for a macro mean. Rows with an ``error`` never enter a mean; they are counted.

Tables: :func:`subtask_scores` (one row per group and subtask) and :func:`macro_scores` (one row per
group), both with interval, samples, valid and failed rows; :func:`macro_score` is one cell's.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

# One sample: the unit the bootstrap resamples. Questions of one sample are averaged first.
SAMPLE_KEY = ["model", "task", "subtask", "requested_length", "query_aware", "sample_id"]


def bootstrap_ci(values, resamples: int = 1000, level: float = 0.95, seed=0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaN dropped), seeded."""
    return stratified_ci([values], resamples, level, seed)


def stratified_ci(strata: list, resamples: int = 1000, level: float = 0.95, seed=0) -> tuple[float, float]:
    """Percentile bootstrap interval of the unweighted mean of the strata's means, each stratum
    resampled on its own (one stratum: the plain bootstrap of a mean)."""
    groups = [np.asarray(g, dtype=float) for g in strata]
    groups = [g[~np.isnan(g)] for g in groups]
    groups = [g for g in groups if len(g)]
    if not groups:
        return float("nan"), float("nan")
    if all(len(g) == 1 or np.all(g == g[0]) for g in groups):
        value = float(np.mean([g[0] for g in groups]))
        return value, value
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for g in groups:
        n = len(g)
        per_chunk = max(1, 2_000_000 // n)  # bounds the index matrix for large n
        drawn = [g[rng.integers(0, n, size=(min(per_chunk, resamples - start), n))].mean(axis=1)
                 for start in range(0, resamples, per_chunk)]
        means += np.concatenate(drawn)
    means /= len(groups)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def valid_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows that measured something: no error, a score."""
    return frame[frame["error"].isna() & frame["score"].notna()]


def sample_means(frame: pd.DataFrame, by: list[str], column: str = "score") -> pd.DataFrame:
    """Mean ``column`` per sample (over its questions) within each ``by`` group; error rows left out."""
    valid = frame[frame["error"].isna() & frame[column].notna()]
    keys = by + [k for k in SAMPLE_KEY if k not in by]
    return valid.groupby(keys, dropna=False, sort=False)[column].mean().reset_index()


def macro_score(frame: pd.DataFrame, resamples: int = 1000, level: float = 0.95, seed=0,
                column: str = "score") -> dict:
    """One cell's score: the macro mean over its subtasks of per-subtask sample means, with its
    stratified interval, and how many samples, subtasks and error rows stand behind it."""
    per_sample = sample_means(frame, ["subtask"], column)
    strata = [g[column].to_numpy() for _, g in per_sample.groupby("subtask", sort=True)]
    score = float(np.mean([s.mean() for s in strata])) if strata else float("nan")
    low, high = stratified_ci(strata, resamples, level, seed)
    return {"score": score, "ci_low": low, "ci_high": high, "samples": len(per_sample),
            "subtasks": len(strata), "errors": int(frame["error"].notna().sum())}


def group_seed(seed: int, key) -> list[int]:
    """A seed per group, so a group's interval does not depend on which other groups are shown."""
    return [seed, zlib.crc32(repr(key).encode())]


SUBTASK_COLUMNS = ["score", "ci_low", "ci_high", "samples", "rows", "errors"]


def subtask_scores(frame: pd.DataFrame, by: list[str], resamples: int = 1000, level: float = 0.95, seed=0,
                   column: str = "score") -> pd.DataFrame:
    """One row per (``by`` group, task, subtask): the mean of the subtask's sample means with its
    bootstrap interval over samples, the samples and rows behind it and the rows that failed.

    A subtask whose every row failed has ``samples`` 0 and an empty score: it is shown, not dropped.
    """
    keys = [*by, *[k for k in ("task", "subtask") if k not in by]]
    if frame.empty:
        return pd.DataFrame(columns=[*keys, *SUBTASK_COLUMNS])
    per_sample = sample_means(frame, keys, column)
    failed = frame["error"].notna()
    counts = frame.assign(_error=failed, _ok=~failed & frame[column].notna()).groupby(
        keys, dropna=False, sort=True).agg(rows=("_ok", "sum"), errors=("_error", "sum"))
    stats = {}
    for key, group in per_sample.groupby(keys, dropna=False, sort=False):
        values = group[column].to_numpy(dtype=float)
        low, high = bootstrap_ci(values, resamples, level, group_seed(seed, key))
        stats[key] = (float(values.mean()), low, high, len(values))
    out = []
    for key, row in counts.iterrows():
        key = key if isinstance(key, tuple) else (key,)
        score, low, high, samples = stats.get(key, (np.nan, np.nan, np.nan, 0))
        out.append((*key, score, low, high, samples, int(row["rows"]), int(row["errors"])))
    return pd.DataFrame(out, columns=[*keys, *SUBTASK_COLUMNS])


MACRO_COLUMNS = ["score", "ci_low", "ci_high", "samples", "subtasks", "rows", "errors", "empty_subtasks"]


def macro_scores(frame: pd.DataFrame, by: list[str], resamples: int = 1000, level: float = 0.95, seed=0,
                 column: str = "score") -> pd.DataFrame:
    """One row per ``by`` group: the unweighted mean over its (task, subtask)s of their sample means
    (LongBench's and RULER's macro average), with an interval stratified by subtask, and the samples,
    subtasks, valid rows and failed rows behind it.

    A group with a subtask that has rows but no valid sample (``empty_subtasks`` > 0) gets no score:
    averaging the other subtasks would silently change what the mean is over.
    """
    if frame.empty:
        return pd.DataFrame(columns=[*by, *MACRO_COLUMNS])
    per_sample = sample_means(frame, [*by, "task", "subtask"], column)
    grouped_samples = dict(iter(per_sample.groupby(by, dropna=False, sort=False)))
    out = []
    for key, group in frame.groupby(by, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        samples = grouped_samples.get(key, per_sample.iloc[0:0])
        strata = [g[column].to_numpy(dtype=float) for _, g in samples.groupby(["task", "subtask"], dropna=False,
                                                                              sort=True)]
        present = group[["task", "subtask"]].drop_duplicates()
        empty = len(present) - len(strata)
        failed = group["error"].notna()
        valid = int((~failed & group[column].notna()).sum())
        if strata and not empty:
            score = float(np.mean([s.mean() for s in strata]))
            low, high = stratified_ci(strata, resamples, level, group_seed(seed, key))
        else:
            score = low = high = np.nan
        out.append((*key, score, low, high, int(sum(len(s) for s in strata)), len(present), valid,
                    int(failed.sum()), int(empty)))
    return pd.DataFrame(out, columns=[*by, *MACRO_COLUMNS])


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean score, measured ratio and token match per (subtask, method, target ratio)."""
    if frame.empty:
        return frame
    grouped = frame.groupby(["subtask", "method", "target_ratio"], dropna=False)
    table = grouped.agg(
        rows=("score", "size"),
        score=("score", "mean"),
        measured_ratio=("measured_ratio", "mean"),
        token_match=("token_match", "mean"),
        kv_bytes_physical=("kv_bytes_physical", "mean"),
        decode_s=("decode_s", "mean"),
    )
    return table.reset_index()
