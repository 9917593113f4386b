"""Honest aggregation (issue 16), the memory axis (issue 17) and `kvbench report` / `kvbench rescore`
(issue 21): numbers against pandas and hand-worked cases, kvdirect run through the real pipeline
on a tiny model with its bytes worked out by hand, and the Markdown report of the committed results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvbench.cli import main
from kvbench.results import COLUMNS, SCHEMA, ResultsWriter, load
from kvbench.results.stats import macro_scores, subtask_scores
from kvbench.results.table import leaderboard, notes, per_subtask

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "smollm2-135m-ruler-1k"


def row(method, ratio, subtask, sample, score, question="q0", error=None, physical=500, full=1000, **extra):
    return {"run_id": "r", "model": "m", "task": "ruler", "subtask": subtask, "requested_length": 512,
            "query_aware": False, "sample_id": f"{subtask}-{sample}", "question_id": question, "method": method,
            "method_config": "{}", "allocation": "uniform", "target_ratio": ratio, "measured_ratio": ratio,
            "kv_bytes_full": full, "kv_bytes_kept": physical, "kv_bytes_physical": physical, "prefill_s": 0.1,
            "scoring_s": 0.0, "decode_s": 0.2, "context_tokens": 100, "score": None if error else score,
            "token_match": None if error else 1.0, "error": error, **extra}


def frame_of(rows: list[dict]) -> pd.DataFrame:
    """Rows as a read results frame: every SCHEMA column, missing ones empty."""
    return pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA).to_pandas()


# --- per-subtask means, then the macro mean ------------------------------------------------------


def unequal_subtasks() -> pd.DataFrame:
    """Subtask a: 4 samples scoring 100; subtask b: 1 sample scoring 0 (two questions, 0 and 0)."""
    rows = [row("snapkv", 0.5, "a", s, 100.0) for s in range(4)]
    rows += [row("snapkv", 0.5, "b", 0, 0.0), row("snapkv", 0.5, "b", 0, 0.0, question="q1")]
    return frame_of(rows)


def test_macro_mean_weighs_every_subtask_equally():
    frame = unequal_subtasks()
    board = leaderboard(frame).set_index("variant")
    # the benchmarks' macro mean: (100 + 0) / 2, not the pooled mean over 5 samples (80)
    assert board.loc["snapkv", "score"] == 50.0
    assert board.loc["snapkv", "samples"] == 5 and board.loc["snapkv", "subtasks"] == 2
    # both subtasks are constant, so every resample gives the same macro mean
    assert board.loc["snapkv", "ci_low"] == board.loc["snapkv", "ci_high"] == 50.0
    subs = per_subtask(frame).set_index("subtask")
    assert subs.loc["a", "score"] == 100.0 and subs.loc["a", "samples"] == 4
    assert subs.loc["b", "score"] == 0.0 and subs.loc["b", "samples"] == 1 and subs.loc["b", "rows"] == 2


def test_two_dtypes_of_one_method_are_two_cells_not_one_pooled_mean():
    # the same samples in bfloat16 (all right) and float32 (all wrong): pooling would say 50 for both
    rows = [row("gated", 0.5, "a", s, 100.0, dtype="bfloat16") for s in range(3)]
    rows += [row("gated", 0.5, "a", s, 0.0, dtype="float32") for s in range(3)]
    board = leaderboard(frame_of(rows)).set_index("variant")
    assert board.loc["gated (dtype=bfloat16)", "score"] == 100.0
    assert board.loc["gated (dtype=float32)", "score"] == 0.0
    assert set(board["samples"]) == {3}


def test_macro_interval_is_stratified_by_subtask():
    rng = np.random.default_rng(3)
    a = rng.normal(60, 20, 40)
    b = rng.normal(20, 5, 10)
    frame = frame_of([row("x", 0.5, "a", i, v) for i, v in enumerate(a)]
                     + [row("x", 0.5, "b", i, v) for i, v in enumerate(b)])
    got = macro_scores(frame, ["method"]).iloc[0]
    assert got["score"] == pytest.approx((a.mean() + b.mean()) / 2)
    # the normal approximation: the variance of a mean of two independent means
    se = np.sqrt(a.var() / len(a) + b.var() / len(b)) / 2
    assert (got["ci_high"] - got["ci_low"]) / 2 == pytest.approx(1.96 * se, rel=0.15)


def test_failed_rows_are_counted_and_a_subtask_without_valid_samples_empties_the_cell():
    rows = [row("snapkv", 0.5, "a", 0, 100.0), row("snapkv", 0.5, "a", 1, 0.0, error="RuntimeError: boom"),
            row("snapkv", 0.5, "b", 0, 50.0)]
    board = leaderboard(frame_of(rows)).set_index("variant")
    assert board.loc["snapkv", "score"] == 75.0 and board.loc["snapkv", "errors"] == 1
    assert board.loc["snapkv", "samples"] == 2
    # every row of subtask b failed: the mean over a alone would be another quantity, so no score
    rows[2] = row("snapkv", 0.5, "b", 0, 50.0, error="RuntimeError: boom")
    board = leaderboard(frame_of(rows)).set_index("variant")
    assert np.isnan(board.loc["snapkv", "score"]) and board.loc["snapkv", "empty_subtasks"] == 1
    subs = subtask_scores(frame_of(rows), ["method"]).set_index("subtask")
    assert subs.loc["b", "samples"] == 0 and subs.loc["b", "errors"] == 1 and np.isnan(subs.loc["b", "score"])


def test_a_file_with_nan_or_inf_scores_is_skipped_with_the_reason(tmp_path):
    ResultsWriter(tmp_path, "good").add([row("full", 0.0, "a", 0, 100.0)])
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        table = pa.Table.from_pylist([row("full", 0.0, "a", 0, 100.0)])
        table = table.set_column(table.column_names.index("score"), "score", pa.array([value]))
        pq.write_table(table, tmp_path / f"{name}.parquet")
    loaded = load(tmp_path)
    assert dict(loaded.skipped) == {"nan.parquet": "column score holds NaN or infinite values",
                                    "inf.parquet": "column score holds NaN or infinite values"}
    assert len(loaded.frame) == 1


# --- the memory axis: kvdirect through the real pipeline ------------------------------------------


@pytest.fixture(scope="module")
def kvdirect_results(tmp_path_factory) -> Path:
    from tiny_models import save_tiny

    tmp = tmp_path_factory.mktemp("kvdirect")
    # one KV head of 16 dims: a token's K/V is 32 values per layer, its residual 64 (SmolLM2's 1.5x, doubled)
    model = save_tiny(tmp / "tiny", "qwen3", max_position_embeddings=2048, num_key_value_heads=1)
    out = tmp / "results"
    assert main(["sweep", "--model", str(model), "--methods", "kvdirect,window", "--ratios", "0.5,0.9",
                 "--task", "ruler:niah_single_1,niah_single_2", "--length", "512", "--samples", "1",
                 "--out", str(out), "--prefill-chunk", "100", "--dtype", "float32"]) == 0
    return out


def test_kvdirect_sits_where_its_bytes_put_it(kvdirect_results):
    from kvbench.leaderboard_app import charts, data

    frame = data.load(kvdirect_results).frame
    assert frame["error"].isna().all()
    rows = frame[frame["method"] == "kvdirect"]
    layers, fp32 = 2, 4
    ctx = rows["context_tokens"].to_numpy()
    window = ctx - np.round(rows["target_ratio"].to_numpy() * ctx)
    full = ctx * layers * 2 * 1 * 16 * fp32  # K and V, one head of 16 dims
    physical = window * layers * 32 * fp32 + ctx * layers * 64 * fp32  # live K/V + every token's residual
    np.testing.assert_array_equal(rows["kv_bytes_full"], full)
    np.testing.assert_array_equal(rows["kv_bytes_physical"], physical)

    board = data.leaderboard(frame).set_index(["method", "target_ratio"])
    for ratio in (0.5, 0.9):
        chosen = rows["target_ratio"] == ratio
        by_hand = np.mean(1 - physical[chosen] / full[chosen])  # about -1.5 and -1.1
        assert board.loc[("kvdirect", ratio), "memory_saving"] == pytest.approx(by_hand, abs=1e-12)
        assert by_hand < -1
        assert board.loc[("window", ratio), "memory_saving"] > 0
        assert board.loc[("kvdirect", ratio), "token_match"] == 1.0
    assert board.loc[("full", 0.0), "memory_saving"] == pytest.approx(0.0, abs=1e-3)  # packed offsets only

    # the default chart: kvdirect left of zero, window right of it
    figure = charts.score_vs_memory(board.reset_index())
    traces = {t.name: t for t in figure.data}
    assert all(x < 0 for x in traces["kvdirect"].x) and all(x > 0 for x in traces["window"].x)
    assert "memory saved" in figure.layout.xaxis.title.text
    said = notes(board.reset_index())
    assert any(n.startswith("kvdirect: exact") and "costs memory and time on this model" in n for n in said), said


# --- kvbench report -------------------------------------------------------------------------------


def independent_board(folder: Path) -> pd.DataFrame:
    """The committed results' leaderboard with plain pandas: sample means, subtask means, macro mean."""
    raw = pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))])
    ok = raw[raw["error"].isna()].fillna({"target_ratio": -1.0})  # a threshold method's ratio is measured
    sample = ok.groupby(["method", "target_ratio", "subtask", "sample_id"])["score"].mean()
    subtask = sample.groupby(["method", "target_ratio", "subtask"]).mean()
    board = subtask.groupby(["method", "target_ratio"]).mean().to_frame("score")
    board["samples"] = sample.groupby(["method", "target_ratio"]).size()
    saving = 1 - ok["kv_bytes_physical"] / ok["kv_bytes_full"]
    board["memory_saving"] = saving.groupby([ok["method"], ok["target_ratio"]]).mean()
    return board


def parse_markdown_table(text: str, first_header: str) -> list[dict]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split(" | ")]
    out = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        out.append(dict(zip(header, (c.strip() for c in line.strip().strip("|").split(" | ")))))
    return out


def test_markdown_report_of_the_committed_results(tmp_path, capsys):
    out = tmp_path / "report.md"
    assert main(["report", str(COMMITTED), "--format", "md", "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""
    text = out.read_text()
    assert "### smollm2-135m · ruler · query-agnostic" in text
    rows = parse_markdown_table(text, "method")
    expected = independent_board(COMMITTED)
    assert len(rows) == len(expected) == 30  # full + 7 methods x 4 ratios + kvzap at its threshold
    assert rows[0]["method"] == "full"
    for r in rows:
        key = (r["method"], -1.0 if r["ratio"] == "threshold" else float(r["ratio"]))
        score, rest = r["score [95% CI] n"].split(" [", 1)
        assert float(score) == pytest.approx(expected.loc[key, "score"], abs=0.05), key
        assert rest.endswith(f"n={expected.loc[key, 'samples']}")
        assert float(r["memory saved"].rstrip("%")) == pytest.approx(100 * expected.loc[key, "memory_saving"],
                                                                    abs=0.05)
    kvdirect = [r for r in rows if r["method"] == "kvdirect"]
    assert all(r["memory saved"].startswith("-") for r in kvdirect)
    assert "kvdirect: exact (token match 1.000 at every ratio), costs memory and time on this model" in text
    # per-subtask scores, each with the samples behind it
    subtasks = parse_markdown_table(text.split("<summary>Per subtask</summary>")[1], "method")
    assert set(subtasks[0]) == {"method", "ratio", "niah_multikey_1", "niah_single_1", "niah_single_2"}
    assert all(cell.endswith("n=2") for r in subtasks for k, cell in r.items() if k.startswith("niah"))
    # to standard output when no --out
    assert main(["report", str(COMMITTED)]) == 0
    assert capsys.readouterr().out == text


def test_report_marks_failed_rows_and_lists_skipped_files(tmp_path):
    rows = [row("full", 0.0, "a", s, 100.0, physical=1000) for s in range(3)]
    rows += [row("snapkv", 0.5, "a", 0, 100.0), row("snapkv", 0.5, "a", 1, 0.0),
             row("snapkv", 0.5, "a", 2, None, error="RuntimeError: CUDA out of memory")]
    ResultsWriter(tmp_path, "part").add(rows)
    (tmp_path / "broken.parquet").write_bytes(b"garbage")
    from kvbench.report import render

    text = render(tmp_path, "md")
    snap = next(r for r in parse_markdown_table(text, "method") if r["method"] == "snapkv")
    assert snap["score [95% CI] n"].startswith("50.0 [") and snap["score [95% CI] n"].endswith("n=2 ⚠ 1 failed row")
    assert "Skipped 1 file(s): broken.parquet: unreadable parquet" in text


@pytest.mark.parametrize("argv, message", [
    (["report", "/nonexistent/results"], "does not exist"),
    (["report", "{empty}"], "holds no readable results"),
    (["report", "{empty}", "--out", "{empty}"], "is a folder"),
    (["rescore", "/nonexistent/results"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    argv = [a.replace("{empty}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# --- kvbench rescore ------------------------------------------------------------------------------


def test_rescore_recomputes_scores_and_keeps_everything_else(tmp_path, capsys):
    def scored(sample, prediction, references, stored, metric="string_match_all", **extra):
        return {**row("snapkv", 0.5, "a", sample, stored, metric=metric), "prediction": prediction,
                "reference": json.dumps(references), **extra}

    rows = [
        scored(0, "The numbers are 123 and 456.", ["123", "456"], 50.0),  # stale: the metric now gives 100
        scored(1, "Only 123.", ["123", "456"], 50.0),  # correct already
        scored(2, "answer", ["x"], 0.0, metric="acc"),  # an lm-eval metric: kept
        {**row("snapkv", 0.5, "a", 3, None, error="RuntimeError: boom"), "prediction": None, "metric": "qa_f1"},
    ]
    table = pa.Table.from_pylist(rows)
    table = table.append_column("extra_note", pa.array(["kept", "as", "it", "is"]))  # a column kvbench lacks
    table = table.replace_schema_metadata({b"origin": b"test"})
    path = tmp_path / "part.parquet"
    pq.write_table(table, path)

    assert main(["rescore", str(tmp_path), "--dry-run"]) == 0
    assert "1 changed" in capsys.readouterr().out and pq.read_table(path).equals(table)

    assert main(["rescore", str(tmp_path)]) == 0
    said = capsys.readouterr().out
    assert "2 rows rescored, 1 changed (largest change 50 points)" in said
    assert "1 (failed rows)" in said and "1 (metric 'acc' is not a kvbench metric)" in said
    after = pq.read_table(path)
    # by hand: both references found, one of two found, an lm-eval row kept, a failed row kept empty
    assert after.column("score").to_pylist() == [100.0, 50.0, 0.0, None]
    others = [c for c in table.column_names if c != "score"]
    assert after.select(others).equals(table.select(others)) and after.schema.metadata == table.schema.metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.parquet"]  # no temporary left behind
    assert main(["rescore", str(tmp_path)]) == 0 and "0 changed" in capsys.readouterr().out


def test_a_cell_that_evicts_nothing_saves_no_memory_rather_than_costing_it():
    """A few bytes of per-head offsets above the full cache are not kvdirect's residual checkpoints."""
    board = pd.DataFrame([
        {"variant": "full", "method": "full", "target_ratio": 0.0, "memory_saving": 0.0, "token_match": 1.0,
         "decode_s": 1.0},
        {"variant": "simlayerkv", "method": "simlayerkv", "target_ratio": None, "memory_saving": -0.0002,
         "token_match": 1.0, "decode_s": 1.0},
        {"variant": "kvdirect", "method": "kvdirect", "target_ratio": 0.5, "memory_saving": -1.0,
         "token_match": 1.0, "decode_s": 3.0},
    ])
    said = notes(board)
    assert said[0] == ("kvdirect: exact (token match 1.000 at every ratio), costs memory and time on this model: "
                       "2.00–2.00× the full cache's KV bytes and 3.0–3.0× the full cache's decoding time")
    assert said[1].startswith("Saves no memory") and "simlayerkv @ " in said[1] and "kvdirect" not in said[1]
