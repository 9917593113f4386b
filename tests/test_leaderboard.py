"""The leaderboard (issue 8): its numbers against pandas computing the same aggregate, and the app in
Streamlit's AppTest on an empty folder, a folder with broken files and a normal folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

from kvbench.results import ResultsWriter  # noqa: E402
from kvbench.leaderboard_app import data  # noqa: E402

APP = ROOT / "leaderboard_app" / "app.py"
MODEL = "tiny-synthetic"
SUBTASKS = ["cwe", "niah_single_1", "vt"]
METHODS = {"window": 0.9, "snapkv": 0.35, "random": 1.2}  # how fast each loses accuracy with the ratio
RATIOS = [0.25, 0.5, 0.75]
SAMPLES = 8  # per subtask
TOKEN_BYTES = 9216  # KV bytes per context token of the made-up model


def _rows_for_run(rng, run_id, method, ratio, query_aware=False, model=MODEL, length=1024):
    """What one `kvbench run --method M --ratio R` writes: the full baseline and the method, same samples."""
    command = f"kvbench run --method {method} --ratio {ratio} --model {model} --length {length}"
    common = {
        "run_id": run_id, "created_at": "2025-01-01T00:00:00+00:00", "command": command, "git_sha": "abc1234",
        "kvbench_version": "0.1.0", "torch_version": "2.5.0", "transformers_version": "5.0.0", "device": "cpu",
        "dtype": "float32", "model": model, "task": "ruler", "requested_length": length, "allocation": "uniform",
        "query_aware": query_aware, "prefill_chunk": 512, "seed": 0, "metric": "string_match_all",
        "peak_mem_kind": "kv_cache",
    }
    rows = []
    for subtask in SUBTASKS:
        for index in range(SAMPLES):
            sample_id = f"{subtask}-{length}-0-{index}"
            context = int(length - 40 - rng.integers(0, 30))
            questions = 2 if index % 3 == 0 else 1  # unequal question counts: per-sample means matter
            for name, r in (("full", 0.0), (method, ratio)):
                full = name == "full"
                measured = 0.0 if full else ratio + float(rng.normal(0, 0.004))
                kept = int(context * TOKEN_BYTES * (1 - measured))
                for q in range(questions):
                    p = 0.9 if full else max(0.02, 0.9 - METHODS[method] * ratio)
                    error = None
                    if method == "snapkv" and ratio == 0.75 and index == 1 and not full:
                        error = "RuntimeError: CUDA out of memory"
                    rows.append({
                        **common, "subtask": subtask, "context_tokens": context, "sample_id": sample_id,
                        "question_id": f"{sample_id}-q{q}", "method": name,
                        "method_config": json.dumps({"sinks": 4, "seed": 0}), "target_ratio": r,
                        "measured_ratio": measured, "kv_bytes_full": context * TOKEN_BYTES, "kv_bytes_kept": kept,
                        # `random` masks instead of shrinking in this made-up data: it saves no memory
                        "kv_bytes_physical": context * TOKEN_BYTES if name == "random" else kept,
                        "peak_mem_bytes": context * TOKEN_BYTES + 1000, "prefill_s": 0.5 + rng.random() * 0.1,
                        "scoring_s": 0.0 if full else 0.05 * (1 + (name == "snapkv")), "decode_s": 0.2,
                        "new_tokens": 12, "prediction": "x", "reference": '["x"]',
                        "score": None if error else float(rng.random() < p) * 100,
                        "token_match": None if error else (
                            1.0 if full else float(np.clip(1.1 - ratio - rng.random() * 0.3, 0, 1))),
                        "error": error,
                    })
    return rows


def write_synthetic(folder: Path) -> Path:
    """A results folder like a small sweep writes: one part file per (method, ratio) run."""
    rng = np.random.default_rng(7)
    for method in METHODS:
        for ratio in RATIOS:
            run_id = f"run-{method}-{ratio}"
            ResultsWriter(folder, run_id).add(_rows_for_run(rng, run_id, method, ratio))
    # query-aware snapkv and a second, smaller model: filtered out by default
    ResultsWriter(folder, "run-qa").add(_rows_for_run(rng, "run-qa", "snapkv", 0.5, query_aware=True))
    ResultsWriter(folder, "run-other").add(_rows_for_run(rng, "run-other", "snapkv", 0.5, model="other-model"))
    return folder


def expected_board(folder: Path) -> pd.DataFrame:
    """The leaderboard computed independently: straight pandas over the raw parquet files."""
    raw = pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))], ignore_index=True)
    raw = raw[(raw["model"] == MODEL) & (~raw["query_aware"])]
    ok = raw[raw["error"].isna()]
    per_sample = ok.groupby(["method", "target_ratio", "subtask", "sample_id"])["score"].mean()
    board = per_sample.groupby(["method", "target_ratio"]).agg(["size"])
    board.columns = ["samples"]
    # the macro mean: per-subtask means, then their unweighted mean
    board["score"] = per_sample.groupby(["method", "target_ratio", "subtask"]).mean().groupby(
        ["method", "target_ratio"]).mean()
    board["gap_to_full"] = board["score"] - board.loc[("full", 0.0), "score"]
    means = ok.groupby(["method", "target_ratio"])[["measured_ratio", "token_match", "kv_bytes_physical"]].mean()
    board = board.join(means)
    board["errors"] = raw.groupby(["method", "target_ratio"])["error"].count()
    board["std"] = per_sample.groupby(["method", "target_ratio"]).std(ddof=0)
    return board


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("results"))


def filtered_board(folder: Path) -> pd.DataFrame:
    loaded = data.load(folder)
    selected = data.select(loaded.frame, data.Filters(model=MODEL, task="ruler", query_aware=False))
    return data.leaderboard(selected)


# --- the numbers -------------------------------------------------------------------------------


def test_leaderboard_matches_pandas(results):
    board = filtered_board(results).set_index(["method", "target_ratio"])
    expected = expected_board(results)
    assert sorted(board.index) == sorted(expected.index)  # 1 full + 3 methods × 3 ratios
    assert len(board) == 10
    for col in ["score", "gap_to_full", "measured_ratio", "token_match", "kv_bytes_physical"]:
        np.testing.assert_allclose(board.loc[expected.index, col], expected[col], rtol=1e-9, err_msg=col)
    assert (board.loc[expected.index, "samples"] == expected["samples"]).all()
    assert (board.loc[expected.index, "errors"] == expected["errors"]).all()
    assert board.loc[("snapkv", 0.75), "errors"] == 3  # sample 1 of each subtask failed
    assert board.loc[("snapkv", 0.75), "samples"] == 3 * SAMPLES - 3
    # the full baseline was written by all nine runs: still one sample each, not nine
    assert board.loc[("full", 0.0), "samples"] == 3 * SAMPLES


def test_mean_over_questions_first(results):
    """Averaging rows directly would weight samples with two questions twice: the board must not."""
    board = filtered_board(results).set_index(["method", "target_ratio"])
    raw = pd.concat([pd.read_parquet(p) for p in results.glob("*.parquet")])
    raw = raw[(raw["model"] == MODEL) & ~raw["query_aware"] & raw["error"].isna()]
    row_means = raw.groupby(["method", "target_ratio"])["score"].mean()
    differs = (board.loc[row_means.index, "score"] - row_means).abs() > 1e-6
    assert differs.any()


def test_bootstrap_interval(results):
    board = filtered_board(results).set_index(["method", "target_ratio"])
    expected = expected_board(results)
    board = board.loc[expected.index]
    assert (board["ci_low"] <= board["score"] + 1e-9).all() and (board["score"] <= board["ci_high"] + 1e-9).all()
    # against the normal approximation of the mean's interval: 1.96 standard errors each side
    half = 1.96 * expected["std"] / np.sqrt(expected["samples"])
    width = (board["ci_high"] - board["ci_low"]) / 2
    varying = half > 0
    np.testing.assert_allclose(width[varying], half[varying], rtol=0.3)
    # seeded: the same numbers on every call, and a group's interval does not depend on the others shown
    again = filtered_board(results).set_index(["method", "target_ratio"]).loc[expected.index]
    assert board["ci_low"].equals(again["ci_low"])
    loaded = data.load(results)
    only_snap = data.leaderboard(data.select(loaded.frame, data.Filters(
        model=MODEL, query_aware=False, methods=("snapkv",)))).set_index(["method", "target_ratio"])
    assert only_snap.loc[("snapkv", 0.5), "ci_low"] == board.loc[("snapkv", 0.5), "ci_low"]


def test_bootstrap_ci_unit():
    assert data.bootstrap_ci([]) != data.bootstrap_ci([])  # (nan, nan)
    assert data.bootstrap_ci([42.0]) == (42.0, 42.0)
    values = np.random.default_rng(0).normal(50, 10, 400)
    low, high = data.bootstrap_ci(values, seed=1)
    se = values.std() / np.sqrt(len(values))
    assert low < values.mean() < high
    assert abs((high - low) / 2 - 1.96 * se) < 0.15 * 1.96 * se


def test_filters_keep_the_baseline(results):
    loaded = data.load(results)
    chosen = data.select(loaded.frame, data.Filters(model=MODEL, query_aware=False, methods=("window",),
                                                    subtasks=("vt",)))
    assert set(chosen["method"]) == {"full", "window"}
    assert set(chosen["subtask"]) == {"vt"}
    # query-aware rows of snapkv: their own run wrote their own full rows
    aware = data.select(loaded.frame, data.Filters(model=MODEL, query_aware=True))
    assert set(aware["method"]) == {"full", "snapkv"} and aware["query_aware"].all()
    # without a baseline in the chosen mode, the other mode's full rows stand in
    frame = loaded.frame[~(loaded.frame["query_aware"] & (loaded.frame["method"] == "full"))]
    aware = data.select(frame, data.Filters(model=MODEL, query_aware=True))
    assert "full" in set(aware["method"]) and aware.loc[aware["method"] == "snapkv", "query_aware"].all()


def test_variants_split_configs():
    frame = pd.DataFrame({
        "method": ["snapkv", "snapkv", "window", "snapkv"],
        "method_config": ['{"window_size": 64, "seed": 0}', '{"window_size": 32, "seed": 0}', '{"seed": 0}',
                          '{"window_size": 64, "seed": 1}'],
        "allocation": ["uniform"] * 4,
    })
    assert data.variants(frame).tolist() == [
        "snapkv (window_size=64)", "snapkv (window_size=32)", "window", "snapkv (window_size=64)"]


def test_variants_are_told_apart_within_one_model_and_task_and_by_dtype():
    # Gemma 3's rows name the layers eviction cuts; SmolLM2's do not: that must not relabel SmolLM2's
    frame = pd.DataFrame({
        "model": ["smollm2", "smollm2", "gemma3", "gemma3"],
        "task": ["ruler"] * 4,
        "method": ["gated", "full", "gated", "full"],
        "method_config": ['{"seed": 0}', '{"seed": 0}', '{"compressed_layers": [5], "seed": 0}',
                          '{"compressed_layers": [5], "seed": 0}'],
        "allocation": ["global", "uniform", "global", "uniform"],
        "dtype": ["bfloat16"] * 4,
    })
    assert data.variants(frame).tolist() == ["gated", "full", "gated", "full"]
    # the same method, model and task in two dtypes: two lines, not one pooled average
    two = pd.DataFrame({
        "model": ["m"] * 4, "task": ["ruler"] * 4, "method": ["gated"] * 4,
        "method_config": ['{"seed": 0}'] * 4, "allocation": ["global"] * 4,
        "dtype": ["bfloat16", "float32", "bfloat16", "float32"],
    })
    assert data.variants(two).tolist() == ["gated (dtype=bfloat16)", "gated (dtype=float32)"] * 2


def test_pareto_front():
    cost = [1, 2, 3, 4, 2]
    score = [10, 30, 20, 40, 5]
    assert data.pareto_front(cost, score).tolist() == [True, True, False, True, False]


def test_subtask_matrix(results):
    loaded = data.load(results)
    selected = data.select(loaded.frame, data.Filters(model=MODEL, query_aware=False))
    matrix = data.subtask_matrix(selected, 0.5)
    assert list(matrix.index)[0] == "full" and set(matrix.index) == {"full", *METHODS}
    assert list(matrix.columns) == SUBTASKS
    raw = selected[selected["error"].isna()]
    vt = raw[(raw["method"] == "window") & (raw["target_ratio"] == 0.5) & (raw["subtask"] == "vt")]
    assert matrix.loc["window", "vt"] == pytest.approx(vt.groupby("sample_id")["score"].mean().mean())


def test_broken_and_foreign_files_are_skipped(results, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for part in results.glob("*.parquet"):
        (folder / part.name).write_bytes(part.read_bytes())
    (folder / "broken.parquet").write_bytes(b"PAR1 not really")
    pd.DataFrame({"a": [1, 2]}).to_parquet(folder / "foreign.parquet")
    pd.DataFrame({"method": ["x"], "model": ["m"], "task": ["t"], "subtask": ["s"], "sample_id": ["1"],
                  "target_ratio": [0.5], "score": [[1, 2]]}).to_parquet(folder / "badtype.parquet")
    (folder / ".hidden.parquet").write_bytes(b"ignored")
    loaded = data.load(folder)
    skipped = dict(loaded.skipped)
    assert set(skipped) == {"broken.parquet", "foreign.parquet", "badtype.parquet"}
    assert "unreadable parquet" in skipped["broken.parquet"]
    assert "missing columns" in skipped["foreign.parquet"]
    assert "score" in skipped["badtype.parquet"]
    assert len(loaded.files) == len(list(results.glob("*.parquet")))
    pd.testing.assert_frame_equal(filtered_board(folder), filtered_board(results))


def test_older_part_files_without_new_columns_still_load(tmp_path):
    pd.DataFrame({"method": ["full", "snapkv"], "model": ["m"] * 2, "task": ["ruler"] * 2, "subtask": ["vt"] * 2,
                  "sample_id": ["1", "1"], "target_ratio": [0.0, 0.5], "score": [100.0, 50.0]}
                 ).to_parquet(tmp_path / "old.parquet")
    loaded = data.load(tmp_path)
    assert not loaded.skipped
    board = data.leaderboard(loaded.frame).set_index("method")
    assert board.loc["snapkv", "gap_to_full"] == -50.0


def test_runs_table(results):
    runs = data.runs(data.load(results).frame)
    assert len(runs) == 11
    row = runs.set_index("run_id").loc["run-snapkv-0.5"]
    assert row["command"].startswith("kvbench run --method snapkv --ratio 0.5")
    assert row["git_sha"] == "abc1234" and row["errors"] == 0


# --- the app in AppTest --------------------------------------------------------------------------


def app_on(folder: Path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("KVBENCH_RESULTS", str(folder))
    at = AppTest.from_file(str(APP), default_timeout=60)
    return at.run()


def _text(at) -> str:
    parts = [e.value for kind in ("info", "warning", "markdown", "caption", "code") for e in at.get(kind)]
    return "\n".join(str(p) for p in parts)


@pytest.mark.parametrize("exists", [True, False])
def test_app_without_results_explains_how_to_make_them(tmp_path, monkeypatch, exists):
    folder = tmp_path / "results"
    if exists:
        folder.mkdir()
    at = app_on(folder, monkeypatch)
    assert not at.exception
    text = _text(at)
    assert ("has no results yet" if exists else "does not exist") in text
    assert "kvbench run --method snapkv" in text
    assert len(at.dataframe) == 0


def test_app_lists_skipped_files_and_renders_the_rest(results, tmp_path, monkeypatch):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for part in results.glob("*.parquet"):
        (folder / part.name).write_bytes(part.read_bytes())
    (folder / "broken.parquet").write_bytes(b"garbage")
    pd.DataFrame({"a": [1]}).to_parquet(folder / "foreign.parquet")
    at = app_on(folder, monkeypatch)
    assert not at.exception
    warning = " ".join(w.value for w in at.warning)
    assert "broken.parquet" in warning and "foreign.parquet" in warning and "Skipped 2 file(s)" in warning
    assert len(at.dataframe[0].value) == 10


def test_app_only_broken_files(tmp_path, monkeypatch):
    (tmp_path / "broken.parquet").write_bytes(b"garbage")
    at = app_on(tmp_path, monkeypatch)
    assert not at.exception
    assert "broken.parquet" in at.warning[0].value
    assert "has no results yet" in _text(at)


def test_app_table_matches_pandas(results, monkeypatch):
    at = app_on(results, monkeypatch)
    assert not at.exception
    assert at.sidebar.selectbox[0].value == MODEL  # the model with the most rows comes first
    assert at.sidebar.radio[0].value is False  # query-agnostic
    shown = at.dataframe[0].value.set_index(["method", "ratio"])
    expected = expected_board(results)
    assert len(shown) == len(expected)
    np.testing.assert_allclose(shown.loc[expected.index, "score"], expected["score"], rtol=1e-9)
    np.testing.assert_allclose(shown.loc[expected.index, "gap to full"], expected["gap_to_full"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(shown.loc[expected.index, "measured ratio"], expected["measured_ratio"], rtol=1e-9)
    np.testing.assert_allclose(shown.loc[expected.index, "KV physical (MiB)"], expected["kv_bytes_physical"] / 2**20)
    assert shown.index[0] == ("full", 0.0)
    # memory honesty: the method whose physical bytes equal the full cache is called out
    assert any("Saves no memory" in w.value and "random @ 0.25" in w.value for w in at.warning)
    charts = at.get("plotly_chart")
    assert len(charts) == 6  # score vs memory, score vs entries evicted, heatmap, two Pareto views, fidelity
    score_chart = json.loads(charts[0].proto.spec)
    names = [trace.get("name") for trace in score_chart["data"]]
    assert names == ["random", "snapkv", "window", "full (baseline)"]
    assert score_chart["data"][-1]["line"]["dash"] == "dash"
    assert "kvbench run --method" in at.code[-1].value
    assert [b.label for b in at.get("download_button")] == ["Download table (CSV)", "Download rows (CSV)"]

    # narrowing the filters changes the table the way pandas says
    at.sidebar.multiselect[0].set_value(["vt"])  # subtasks
    at.sidebar.multiselect[-1].set_value(["window"])  # methods
    at.run()
    shown = at.dataframe[0].value
    assert set(shown["method"]) == {"full", "window"}
    raw = pd.concat([pd.read_parquet(p) for p in results.glob("*.parquet")])
    raw = raw[(raw["model"] == MODEL) & ~raw["query_aware"] & (raw["subtask"] == "vt") & raw["error"].isna()]
    window = raw[(raw["method"] == "window") & (raw["target_ratio"] == 0.5)]
    value = shown.set_index(["method", "ratio"]).loc[("window", 0.5), "score"]
    assert value == pytest.approx(window.groupby("sample_id")["score"].mean().mean())


def test_cli_launches_streamlit(monkeypatch, tmp_path):
    import os

    from kvbench.cli import main

    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append((path, argv)))
    assert main(["leaderboard", "--results", str(tmp_path), "--port", "8765"]) == 0
    ((path, cmd),) = calls
    assert path == sys.executable and cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(APP)
    assert cmd[cmd.index("--server.port") + 1] == "8765"
    assert cmd[cmd.index("--server.address") + 1] == "localhost"
    assert cmd[-2:] == ["--results", str(tmp_path.resolve())]
