"""The real default model (SmolLM2-135M-Instruct, from its pinned PyPI wheel) through the whole CLI."""

from __future__ import annotations

import pytest

from kvbench.cli import main
from kvbench.results import read_results

pytestmark = pytest.mark.real_model


def test_default_model_finds_a_1k_needle_with_the_full_cache(tmp_path):
    out = tmp_path / "results"
    assert main(["run", "--method", "window", "--ratio", "0.25", "--task", "ruler:niah_single_1",
                 "--length", "1024", "--samples", "2", "--out", str(out)]) == 0
    frame = read_results(out)
    full = frame[frame["method"] == "full"]
    assert len(full) == 2 and (full["score"] == 100).all(), full["prediction"].tolist()
    assert full["context_tokens"].between(850, 1024).all()
    window = frame[frame["method"] == "window"]
    assert ((window["measured_ratio"] - 0.25).abs() <= 1 / window["context_tokens"]).all()


def test_kvdirect_answers_as_the_full_cache_and_costs_more_bytes_on_the_default_model(tmp_path):
    """The README's figures: residuals are 1.5x the K/V they replace, so 1.6x the full cache at 0.9."""
    out = tmp_path / "results"
    assert main(["run", "--method", "kvdirect", "--ratio", "0.9", "--task", "ruler:niah_single_1",
                 "--length", "1024", "--samples", "1", "--dtype", "bfloat16", "--out", str(out)]) == 0
    frame = read_results(out)
    kvdirect = frame[frame["method"] == "kvdirect"].iloc[0]
    assert kvdirect["token_match"] == 1.0 and kvdirect["score"] == 100
    window = kvdirect["context_tokens"] - round(0.9 * kvdirect["context_tokens"])
    per_token_layer = 2 * 3 * 64 * 2  # K and V, 3 KV heads of 64 dims, bfloat16
    assert kvdirect["kv_bytes_kept"] == 30 * window * per_token_layer
    assert kvdirect["kv_bytes_physical"] == kvdirect["kv_bytes_kept"] + 30 * kvdirect["context_tokens"] * 576 * 2
    assert kvdirect["kv_bytes_physical"] / kvdirect["kv_bytes_full"] == pytest.approx(1.6, abs=0.002)
