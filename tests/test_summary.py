"""The end-of-run summary on rows built by hand, its numbers worked out by hand; ``--json``, ``--quiet``
and ``kvbench summary DIR`` through the command line."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from kvbench.cli import main
from kvbench.results import COLUMNS, ResultsWriter, read_results
from kvbench.results.summary import cells, render
from tiny_models import save_tiny

MIB = 2**20


def row(subtask, sample, question, method, score, *, token_match=None, ratio=0.5, measured=0.5, physical=2,
        peak=8, scoring=0.1, error=None):
    base = {"model": "m", "task": "ruler", "subtask": subtask, "requested_length": 1024, "query_aware": False,
            "sample_id": sample, "question_id": question, "method": method, "method_spec": method,
            "method_config": "{}", "target_ratio": 0.0 if method == "full" else ratio, "metric": "string_match_all",
            "command": "kvbench run", "run_id": "r"}
    if error is not None:
        return {**base, "error": error}
    full = method == "full"
    return {**base, "score": score, "token_match": 1.0 if full else token_match,
            "measured_ratio": 0.0 if full else measured, "kv_bytes_full": 4 * MIB,
            "kv_bytes_physical": 4 * MIB if full else physical * MIB, "kv_bytes_kept": 4 * MIB if full else physical * MIB,
            "peak_mem_bytes": (16 if full else peak) * MIB, "prefill_s": 1.0, "scoring_s": 0.0 if full else scoring,
            "decode_s": 0.3}


def hand_rows() -> pd.DataFrame:
    """Subtask a: samples s1, s2 (two questions), s4 (window failed on it); subtask b: sample s3."""
    rows = [
        row("a", "s1", "q1", "full", 100), row("a", "s1", "q1", "window", 0, token_match=0.5),
        row("a", "s2", "q1", "full", 100), row("a", "s2", "q1", "window", 100, token_match=1.0),
        row("a", "s2", "q2", "full", 50), row("a", "s2", "q2", "window", 100, token_match=0.0),
        row("b", "s3", "q1", "full", 100),
        row("b", "s3", "q1", "window", 50, token_match=0.25, measured=0.6, physical=3, peak=12, scoring=0.5),
        row("a", "s4", "q1", "full", 0), row("a", "s4", "q1", "window", None, error="RuntimeError: out of memory"),
    ]
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def test_cells_match_the_hand_worked_numbers():
    full, window = cells(hand_rows())
    assert (full.method, window.method, window.target_ratio) == ("full", "window", 0.5)
    # full: a = mean(s1 100, s2 75, s4 0) = 58.33, b = 100; macro over subtasks
    assert full.score == pytest.approx((175 / 3 + 100) / 2)
    # window: a = mean(s1 0, s2 100) = 50 (s4 failed), b = 50
    assert window.score == pytest.approx(50.0)
    # bootstrap: a's mean over 2 draws is 0, 50 or 100 (1/4, 1/2, 1/4), b is fixed: macro 25, 50 or 75
    assert window.score_ci == pytest.approx((25.0, 75.0))
    # paired per sample: a: s1 0-100, s2 100-75 -> -37.5; b: 50-100 -> -50; s4 has no window answer
    assert window.gap_to_full == pytest.approx(-43.75)
    assert window.paired_samples == 3
    assert window.gap_to_full != pytest.approx(window.score - full.score)  # unpaired would count s4
    # a's mean difference over 2 draws: -100, -37.5 or 25; macro with b's -50: -75, -43.75 or -12.5
    assert window.gap_ci == pytest.approx((-75.0, -12.5))
    assert window.token_match == pytest.approx((0.5 + 0.5) / 2 / 2 + 0.25 / 2)  # a: s1 0.5, s2 0.5; b: 0.25
    assert window.measured_ratio == pytest.approx((0.5 * 3 + 0.6) / 4)  # mean over the rows that ran
    assert window.kv_bytes_physical == pytest.approx(2.25 * MIB)
    assert window.kv_percent_of_full == pytest.approx(56.25)
    assert window.peak_mem_bytes == pytest.approx(9 * MIB)
    assert (window.prefill_s, window.scoring_s, window.decode_s) == pytest.approx((1.0, 0.2, 0.3))
    assert (window.samples, window.subtasks, window.rows, window.errors) == (3, 2, 5, 1)
    assert full.errors == 0 and full.samples == 4


def test_table_shows_each_number_readably():
    text = render(cells(hand_rows()))
    lines = text.splitlines()
    assert lines[0] == "m · ruler · 1024 tokens · query-agnostic · 4 samples"
    header = lines[1]
    for column in ("score [95% CI]", "gap to full [95% CI]", "tok match", "evicted", "KV MiB", "% full", "peak MiB",
                   "prefill s", "scoring s", "decode s"):
        assert column in header
    window = next(line for line in lines if line.startswith("window"))
    assert window.split() == ["window", "0.5", "50.0", "[25,", "75]", "-43.8", "[-75,", "-12]", "0.375",
                              "0.525", "2.25", "56%", "9.0", "1.00", "0.20", "0.30", "3", "1"]
    full = next(line for line in lines if line.startswith("full"))
    # full: a's mean over 3 draws from {100, 75, 0} is 0 or 100 with 1/27 each (> 2.5%): macro 50 to 100
    assert full.split()[:5] == ["full", "0", "79.2", "[50,", "100]"]
    assert "e+" not in text  # no scientific notation for bytes


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", max_position_embeddings=2048)


def run_args(tiny_dir, out):
    return ["run", "--model", str(tiny_dir), "--method", "window", "--ratio", "0.5", "--task", "ruler:niah_single_1",
            "--length", "512", "--samples", "2", "--out", str(out)]


def test_json_is_the_only_stdout_and_has_every_cell(tiny_dir, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(run_args(tiny_dir, out) + ["--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # nothing else on stdout
    assert "kvbench: 2 samples" in captured.err  # the run's notes went to stderr, with the time left
    assert re.search(r"^\[1/2, \d+:\d\d elapsed, ~\d+:\d\d left\] ruler:niah_single_1 ", captured.err, re.M)
    frame = read_results(out)
    assert summary["rows"] == len(frame) == 4 and summary["errors"] == 0
    assert summary["part_files"] == [str(next(out.glob("*.parquet")))]
    assert summary["results"] == str(out) and summary["leaderboard"] == f"kvbench leaderboard --results {out}"
    by_method = {c["method"]: c for c in summary["cells"]}
    assert set(by_method) == {"full", "window"}
    window = by_method["window"]
    assert set(window) >= {"score", "score_ci", "gap_to_full", "gap_ci", "paired_samples", "token_match",
                           "measured_ratio", "kv_bytes_physical", "kv_bytes_full", "kv_percent_of_full",
                           "peak_mem_bytes", "prefill_s", "scoring_s", "decode_s", "samples", "errors"}
    rows = frame[frame["method"] == "window"]
    assert window["score"] == pytest.approx(rows["score"].mean())
    assert window["kv_bytes_physical"] == pytest.approx(rows["kv_bytes_physical"].mean())
    full_scores = frame[frame["method"] == "full"].set_index("sample_id")["score"]
    assert window["gap_to_full"] == pytest.approx((rows.set_index("sample_id")["score"] - full_scores).mean())
    assert by_method["full"]["gap_to_full"] is None  # JSON null, not NaN


def test_quiet_prints_only_the_final_line(tiny_dir, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(run_args(tiny_dir, out) + ["--quiet"]) == 0
    captured = capsys.readouterr()
    part = next(out.glob("*.parquet"))
    assert captured.out.splitlines() == [
        f"kvbench: wrote 4 rows to {part} · this table again: kvbench summary {out} · "
        f"leaderboard: kvbench leaderboard --results {out}"
    ]
    assert "%|" not in captured.err  # no progress bar


def test_summary_of_a_folder_is_the_table_of_its_rows(tmp_path, capsys):
    frame = hand_rows()
    writer = ResultsWriter(tmp_path / "r", "run")
    writer.add([{k: v for k, v in r.items() if not pd.isna(v)} for r in frame.to_dict("records")])
    assert main(["summary", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert render(cells(read_results(tmp_path / "r"))) in out
    assert "-43.8 [-75, -12]" in out and out.rstrip().endswith(f"kvbench leaderboard --results {tmp_path / 'r'}")
    assert main(["summary", str(tmp_path / "nothing")]) == 2
