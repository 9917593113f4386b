"""The results schema: one row per (sample, question, method, budget), and what identifies a row."""

from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa

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
        ("needle_depth", pa.float64()),  # percent of the haystack before the needle; empty for other tasks
        ("sample_id", pa.string()),
        ("question_id", pa.string()),
        ("method", pa.string()),
        ("method_spec", pa.string()),
        ("method_config", pa.string()),
        ("allocation", pa.string()),
        ("query_aware", pa.bool_()),
        ("prefill_chunk", pa.int64()),
        ("evict_during_prefill", pa.bool_()),
        ("decode_interval", pa.int64()),
        ("decode_batch", pa.int64()),
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

# What identifies a result row: the same key twice is the same measurement.
KEY_COLUMNS = (
    "model", "dtype", "task", "subtask", "requested_length", "query_aware", "prefill_chunk", "evict_during_prefill",
    "decode_interval", "seed", "sample_id", "question_id", "method", "method_config", "target_ratio",
)


def _plain(value):
    """A key value as Python sees it: NaN, NA and None are all "missing"."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def row_key(row: dict) -> tuple:
    return tuple(_plain(row.get(column)) for column in KEY_COLUMNS)
