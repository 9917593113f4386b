"""Parquet results: one row per (sample, question, method, ratio), append-only, written atomically.

Each process writes its own part file ``<out>/<run_id>.parquet`` and rewrites it whole (temporary
file + rename) after every sample, so a crash loses at most the sample in flight and never leaves a
half-written file. The results folder is the union of its part files.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("created_at", pa.string()),
        ("command", pa.string()),
        ("git_sha", pa.string()),
        ("kvbench_version", pa.string()),
        ("torch_version", pa.string()),
        ("transformers_version", pa.string()),
        ("device", pa.string()),
        ("dtype", pa.string()),
        ("model", pa.string()),
        ("task", pa.string()),
        ("subtask", pa.string()),
        ("requested_length", pa.int64()),
        ("context_tokens", pa.int64()),
        ("sample_id", pa.string()),
        ("question_id", pa.string()),
        ("method", pa.string()),
        ("method_config", pa.string()),
        ("allocation", pa.string()),
        ("query_aware", pa.bool_()),
        ("prefill_chunk", pa.int64()),
        ("evict_during_prefill", pa.bool_()),
        ("decode_interval", pa.int64()),
        ("target_ratio", pa.float64()),
        ("measured_ratio", pa.float64()),
        ("kv_bytes_full", pa.int64()),
        ("kv_bytes_kept", pa.int64()),
        ("kv_bytes_physical", pa.int64()),
        ("peak_mem_bytes", pa.int64()),
        ("peak_mem_kind", pa.string()),
        ("prefill_s", pa.float64()),
        ("scoring_s", pa.float64()),
        ("decode_s", pa.float64()),
        ("new_tokens", pa.int64()),
        ("prediction", pa.string()),
        ("reference", pa.string()),
        ("metric", pa.string()),
        ("score", pa.float64()),
        ("token_match", pa.float64()),
        ("first_divergence", pa.int64()),
        ("seed", pa.int64()),
        ("error", pa.string()),
    ]
)
COLUMNS = SCHEMA.names


def git_sha() -> str | None:
    """The commit of the kvbench checkout, if it is one (None for an installed wheel)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class ResultsWriter:
    """Accumulates rows and rewrites this process's part file atomically on every flush."""

    def __init__(self, out_dir: Path, run_id: str):
        self.path = Path(out_dir) / f"{run_id}.parquet"
        self.rows: list[dict] = []

    def add(self, rows: list[dict]) -> None:
        unknown = set().union(*(row.keys() for row in rows)) - set(COLUMNS) if rows else set()
        if unknown:
            raise KeyError(f"unknown result columns: {sorted(unknown)}")
        self.rows.extend(rows)
        self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([{c: row.get(c) for c in COLUMNS} for row in self.rows], schema=SCHEMA)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)


def read_results(path: Path) -> pd.DataFrame:
    """Every part file under ``path`` (a folder or one file) as one frame."""
    path = Path(path)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    frames = [pq.read_table(f).to_pandas() for f in files]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


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
