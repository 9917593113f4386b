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
