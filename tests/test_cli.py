"""`kvbench run` end to end on a tiny local model, and every bad input: one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from kvbench.cli import main
from kvbench.results import COLUMNS, read_results
from tiny_models import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", max_position_embeddings=2048)


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_writes_rows_with_the_requested_ratio(tiny_dir, tmp_path, capsys):
    out = tmp_path / "results"
    code, stdout, _ = run_cli(
        ["run", "--model", str(tiny_dir), "--method", "snapkv", "--ratio", "0.5",
         "--task", "ruler:niah_single_1", "--length", "512", "--samples", "2", "--out", str(out)],
        capsys,
    )
    assert code == 0
    frame = read_results(out)
    assert list(frame.columns) == COLUMNS
    assert sorted(frame["method"].unique()) == ["full", "snapkv"]
    assert len(frame) == 4  # 2 samples × (full + snapkv), one question each
    snap = frame[frame["method"] == "snapkv"]
    # uniform allocation: every head evicts round(0.5 T) entries, so the ratio is 0.5 within a token
    assert ((snap["measured_ratio"] - 0.5).abs() <= 1 / snap["context_tokens"]).all()
    assert (snap["kv_bytes_physical"] < snap["kv_bytes_full"]).all()
    assert (frame.loc[frame["method"] == "full", "token_match"] == 1.0).all()
    assert snap["token_match"].between(0, 1).all()
    assert json.loads(snap["method_config"].iloc[0])["window_size"] == 64
    assert snap["command"].iloc[0].startswith("kvbench run --model")
    assert "snapkv" in stdout and "wrote 4 rows" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nope", "--ratio", "0.5"], "unknown method 'nope'"),
        (["--method", "snapkv", "--ratio", "1.0"], "ratio 1.0 is outside [0, 1)"),
        (["--method", "snapkv", "--ratio", "-0.1"], "ratio -0.1 is outside [0, 1)"),
        (["--method", "full", "--ratio", "0.5"], "method 'full' evicts nothing"),
        (["--method", "snapkv", "--ratio", "0.5", "--task", "nope"], "unknown task 'nope'"),
        (["--method", "snapkv", "--ratio", "0.5", "--task", "ruler:nope"], "unknown subtask ruler:nope"),
        (["--method", "snapkv", "--ratio", "0.5", "--model", "/no/such/model"], "not a readable model folder"),
        (["--method", "snapkv", "--ratio", "0.5", "--length", "4096"], "exceeds what"),
        (["--method", "gated", "--ratio", "0.5"], "kvbench train gated"),  # no gates for this model
        (["--method", "kvzap", "--threshold", "-4"], "kvbench train kvzap"),
        (["--method", "kvzap_ratio", "--ratio", "0.5"], "kvbench train kvzap"),
        (["--method", "kvzap", "--ratio", "0.5"], "kvzap evicts by threshold and measures the ratio: drop --ratio"),
        (["--method", "snapkv"], "no ratio given (needed by snapkv)"),
        (["--method", "finch", "--ratio", "0.5"], "finch's window is the question: run it with --query-aware"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, tiny_dir, tmp_path, capsys):
    out = tmp_path / "results"
    options = {"--model": str(tiny_dir), "--task": "ruler:niah_single_1", "--length": "512", "--out": str(out)}
    options.update(zip(args[::2], args[1::2]))  # every case is flag/value pairs
    code, _, err = run_cli(["run", *[part for pair in options.items() for part in pair]], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("kvbench: error:")]
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.fixture(scope="module")
def tiny_gemma_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3", max_position_embeddings=2048)


def test_run_on_gemma3_compresses_only_the_global_layers(tiny_gemma_dir, tmp_path, capsys):
    out = tmp_path / "results"
    code, stdout, _ = run_cli(
        ["run", "--model", str(tiny_gemma_dir), "--method", "snapkv", "--ratio", "0.5", "--device", "cpu",
         "--dtype", "float32", "--task", "ruler:niah_single_1", "--length", "512", "--samples", "1", "--out", str(out)],
        capsys,
    )
    assert code == 0
    frame = read_results(out)
    snap = frame[frame["method"] == "snapkv"]
    assert json.loads(snap["method_config"].iloc[0])["compressed_layers"] == [1, 3]  # the global layers
    tokens = int(snap["context_tokens"].iloc[0])
    # the ratio is over the global layers alone, which halve; the local layers keep their 15 tokens
    assert abs(float(snap["measured_ratio"].iloc[0]) - 0.5) <= 1 / tokens
    # full cache: 2 global layers x tokens + 2 local layers x 15, 2 KV heads of 16 float32 keys and values
    assert int(frame["kv_bytes_full"].iloc[0]) == (2 * tokens + 2 * 15) * 2 * 2 * 16 * 4


@pytest.mark.parametrize("args, message", [
    (["--method", "gated", "--ratio", "0.5"], "kvbench train gated"),  # no gates for this model
    (["--method", "kvzap", "--threshold", "-4"], "kvbench train kvzap"),
    (["--method", "keyrerotation", "--ratio", "0.5"], "keyrerotation re-rotates keys with one full-width RoPE table"),
])
def test_methods_that_cannot_run_on_gemma3_say_why_in_one_line(args, message, tiny_gemma_dir, tmp_path, capsys):
    out = tmp_path / "results"
    code, _, err = run_cli(["run", "--model", str(tiny_gemma_dir), *args, "--task", "ruler:niah_single_1",
                            "--length", "512", "--out", str(out)], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("kvbench: error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_list_shows_methods_and_tasks(capsys):
    assert main(["list", "methods"]) == 0
    names = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert {"full", "window", "random", "snapkv"} <= names
    assert main(["list", "tasks"]) == 0
    listing = capsys.readouterr().out
    assert "ruler:niah_single_1" in listing and "unavailable" in listing  # qa_1/qa_2 need the hub


def test_list_models_shows_every_alias_and_its_prompt_form(capsys):
    assert main(["list", "models"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "chat model" in lines["smollm2-135m"] and "1 pinned PyPI wheel" in lines["smollm2-135m"]
    assert "base model (plain prompts)" in lines["gemma3-270m"] and "5 pinned PyPI wheels" in lines["gemma3-270m"]


def test_summary_matches_the_rows(tiny_dir, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["run", "--model", str(tiny_dir), "--method", "window", "--ratio", "0.25",
                 "--task", "ruler:niah_single_1", "--length", "512", "--samples", "1", "--out", str(out)]) == 0
    frame = read_results(out)
    assert isinstance(frame, pd.DataFrame) and set(frame["target_ratio"]) == {0.0, 0.25}
