"""Hostile input: every bad argument or file is one line on stderr, exit code 2, no traceback and nothing
written; a results folder or a model cache that a crash or a user damaged is recovered, not fatal."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kvbench.cli import main
from kvbench.results import ResultsWriter, read_results
from test_cli import tiny_dir  # noqa: F401  (module fixture: a saved tiny Llama)

TASK = ["--task", "ruler:niah_single_1", "--length", "512", "--samples", "1"]
PROGRESS = re.compile(r"\d+/\d+ \[")
CELL = ["sample_id", "question_id", "method", "target_ratio"]


def assert_refused(args: list[str], message: str, capsys, watched: list[Path]) -> None:
    """Exit 2, exactly one stderr line (``kvbench: error: ...`` containing ``message``), no traceback, and
    every watched path as it was (absent, or an untouched folder)."""
    before = {p: sorted(x.name for x in p.iterdir()) if p.is_dir() else p.exists() for p in watched}
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines()  # progress bars of a model load that came first are not errors
             if line.strip() and not PROGRESS.search(line) and "Warning" not in line and "warn(" not in line]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("kvbench: error:"), lines
    assert message in lines[0], lines[0]
    after = {p: sorted(x.name for x in p.iterdir()) if p.is_dir() else p.exists() for p in watched}
    assert after == before


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Bad files of every kind a user may point at."""
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(300))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    good = tmp_path / "good.safetensors"
    save_file({"layers.0.q_proj.weight": torch.zeros(4, 4)}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-20])
    wrong = tmp_path / "wrong" / "gated.safetensors"  # right names, tensors of another model
    wrong.parent.mkdir()
    save_file({f"layers.{i}.{k}": torch.zeros(3, 5, 7) for i in range(2) for k in ("q_proj.weight", "q_norm.weight",
                                                                                "k_base")}, str(wrong))
    kvzap = tmp_path / "kvzap"
    kvzap.mkdir()
    (kvzap / "config.json").write_text(json.dumps({"input_dim": 64, "output_dim": 2, "n_modules": 2}))
    (kvzap / "model.safetensors").write_bytes(truncated.read_bytes())
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"body": "a text"}\n')
    not_json = tmp_path / "not_json.jsonl"
    not_json.write_text("plain words\n")
    wrong_json = tmp_path / "results_2026.json"
    wrong_json.write_text('{"something": "else"}')
    broken_json = tmp_path / "broken" / "results_2026.json"
    broken_json.parent.mkdir()
    broken_json.write_text("{not json")
    return {"garbage": garbage, "empty_dir": empty_dir, "truncated": truncated, "wrong": wrong.parent,
            "kvzap": kvzap, "no_text": no_text, "not_json": not_json, "wrong_json": wrong_json,
            "broken_json": broken_json.parent, "a_file": garbage, "missing": tmp_path / "missing"}


RUN_CASES = [  # (args after `kvbench run|sweep`, message); {name} is a file from the fixture
    (["run", "--method", "window", "--ratio", "nan"], "ratio nan is outside [0, 1)"),
    (["run", "--method", "window", "--ratio", "inf"], "ratio inf is outside [0, 1)"),
    (["run", "--method", "window", "--ratio", "abc"], "ratio must be a number"),
    (["run", "--method", "window", "--ratio", "0.5", "--length", "abc"], "argument --length: invalid int"),
    (["run", "--method", "window", "--ratio", "0.5", "--samples", "0"], "--samples must be at least 1"),
    (["run", "--method", "window", "--ratio", "0.5", "--prefill-chunk", "-1"], "--prefill-chunk must be at least 1"),
    (["run", "--method", "window", "--ratio", "0.5", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", "--method", "window", "--ratio", "0.5", "--shard", "0/2"], "unrecognized arguments: --shard"),
    (["run", "--method", "window", "--ratio", "0.5", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["run", "--method", "window", "--ratio", "0.5", "--device", "tpu"], "unknown device 'tpu'"),
    (["run", "--method", "window", "--ratio", "0.5", "--allocation", "nope"], "unknown allocation 'nope'"),
    (["run", "--method", "window", "--ratio", "0.5", "--out", "{a_file}"], "is a file; it takes a results folder"),
    (["run", "--method", "window", "--ratio", "0.5", "--out", "{a_file}/sub"], "is a file, so the folder cannot"),
    (["run", "--method", "window", "--ratio", "0.5", "--data-dir", "{missing}"], "--data-dir"),
    (["run", "--method", "window:sinks=abc", "--ratio", "0.5"], "sinks"),
    (["run", "--method", "window:nope=1", "--ratio", "0.5"], "has no field 'nope'"),
    (["run", "--method", "window", "--ratio", "0.5", "--threshold", "-4"], "--threshold applies to none of window"),
    (["run", "--method", "kvzap", "--threshold", "nan"], "--threshold must be a finite number"),
    (["run", "--method", "simlayerkv", "--threshold", "inf", "--ratio", "0"], "--threshold must be a finite number"),
    (["run", "--method", "gated", "--ratio", "0.5", "--weights", "{missing}"], "--weights"),
    (["run", "--method", "gated", "--ratio", "0.5", "--weights", "{garbage}"], "cannot read gates from"),
    (["run", "--method", "gated", "--ratio", "0.5", "--weights", "{empty_dir}"], "no gates in"),
    (["run", "--method", "gated", "--ratio", "0.5", "--weights", "{truncated}"], "cannot read gates from"),
    (["run", "--method", "gated", "--ratio", "0.5", "--weights", "{wrong}"], "do not fit model"),
    (["run", "--method", "kvzap", "--weights", "{kvzap}"], "KVzap surrogate from"),
    (["run", "--method", "kvzap", "--weights", "{garbage}"], "no KVzap surrogate in"),
    (["sweep", "--methods", "window", "--ratios", "0.5,0.5"], "a ratio is given twice"),
    (["sweep", "--methods", "window,window", "--ratios", "0.5"], "method window is given twice"),
    (["sweep", "--methods", "", "--ratios", "0.5"], "no method given"),
    (["sweep", "--methods", ",", "--ratios", "0.5"], "no method given"),
    (["sweep", "--methods", "window", "--ratios", ""], "no ratio given"),
    (["sweep", "--methods", "window", "--ratios", "0.5,x"], "ratio must be a number, not 'x'"),
    (["sweep", "--methods", "window", "--ratios", "0.5,nan"], "ratio nan is outside [0, 1)"),
    (["sweep", "--methods", "window", "--ratios", "0.5", "--shard", "2/2"], "--shard 2/2"),
    (["sweep", "--methods", "window", "--ratios", "0.5", "--shard", "a/b"], "--shard takes INDEX/COUNT"),
    (["sweep", "--methods", "window", "--ratios", "0.5", "--shard", "1/0"], "--shard 1/0"),
    (["sweep", "--methods", "window"], "the following arguments are required: --ratios"),
]


def _fill(args: list[str], files: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in files.items()}) for a in args]


@pytest.mark.parametrize("args, message", RUN_CASES, ids=[" ".join(c[0][1:]) or "empty" for c in RUN_CASES])
def test_run_and_sweep_refuse_bad_input(args, message, tiny_dir, tmp_path, files, capsys):  # noqa: F811
    out = tmp_path / "results"
    argv = _fill(args, files)
    argv[1:1] = ["--model", str(tiny_dir), *TASK, *([] if "--out" in argv else ["--out", str(out)])]
    assert_refused(argv, message, capsys, [out, *files.values()])


def test_sweep_environment_shard_that_is_not_a_number(tiny_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("RANK", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "results"
    assert_refused(["sweep", "--model", str(tiny_dir), *TASK, "--methods", "window", "--ratios", "0.5",
                    "--out", str(out)], "RANK=x", capsys, [out])


def _results(folder: Path, drop: float = 0.0) -> Path:
    """A real results folder: one part file of two rows, scores lowered by ``drop`` points."""
    row = {"model": "m", "task": "t", "subtask": "s", "sample_id": "0", "question_id": "0", "method": "full",
           "target_ratio": 0.0, "score": 50.0 - drop}
    writer = ResultsWriter(folder, "part")
    writer.add([row, {**row, "sample_id": "1", "score": 100.0 - drop}])
    return folder


CHECK_CASES = [
    (["--tolerance", "nan"], "--tolerance must be a finite number, not nan"),
    (["--tolerance", "inf"], "--tolerance must be a finite number, not inf"),
    (["--tolerance", "-1"], "--tolerance must be at least 0"),
    (["--memory-tolerance", "nan"], "--memory-tolerance must be a finite number"),
    (["--time-tolerance", "-0.5"], "--time-tolerance must be at least 0"),
    (["--tolerance", "five"], "argument --tolerance: invalid float value"),
    (["--metric", ","], "--metric names no metric"),
    (["--format", "html"], "argument --format: invalid choice"),
    (["--output", "{folder}"], "is a folder; it takes a file"),
    (["--baseline", "{missing}"], "does not exist"),
]


@pytest.mark.parametrize("extra, message", CHECK_CASES, ids=[" ".join(c[0]) for c in CHECK_CASES])
def test_check_refuses_bad_input(extra, message, tmp_path, capsys):
    baseline = _results(tmp_path / "baseline")
    options = {"--baseline": str(baseline), "--candidate": str(baseline)}
    filled = [e.format(folder=tmp_path, missing=tmp_path / "missing") for e in extra]
    options.update(zip(filled[::2], filled[1::2]))
    assert_refused(["check", *[p for pair in options.items() for p in pair]], message, capsys, [baseline])


def test_check_nan_tolerance_no_longer_passes_a_planted_regression(tmp_path, capsys):
    """NaN compared false with every drop, so a 30-point regression passed: now refused up front, and the
    same regression with a real tolerance fails."""
    baseline, candidate = _results(tmp_path / "baseline"), _results(tmp_path / "candidate", drop=30)
    assert main(["check", "--baseline", str(baseline), "--candidate", str(candidate), "--tolerance", "nan"]) == 2
    assert main(["check", "--baseline", str(baseline), "--candidate", str(candidate), "--tolerance", "5"]) == 1
    capsys.readouterr()


TRAIN_CASES = [
    (["--texts", "0"], "--texts must be at least 1"),
    (["--steps", "-3"], "--steps must be at least 1"),
    (["--validation", "-1"], "--validation must be at least 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "0"], "--lr must be above 0"),
    (["--data", "{missing}.txt"], "no such file or folder"),
    (["--corpus", "{empty_dir}"], "the folder holds no .txt or .md files"),
    (["--data", "{no_text}"], "line 1 has no text field 'text'"),
    (["--chat-fraction", "2"], "--chat-fraction must be in [0, 1]"),
    (["--data", "{not_json}"], "line 1 is not JSON"),
    (["--data", "{garbage}"], "cannot read it as UTF-8 text"),
    (["--out", "{a_file}"], "is a file; it takes a folder"),
    (["--kind", "cnn"], "argument --kind: invalid choice"),
]


@pytest.mark.parametrize("extra, message", TRAIN_CASES, ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_train_refuses_bad_input(extra, message, tiny_dir, files, capsys):  # noqa: F811
    assert_refused(["train", "kvzap", "--model", str(tiny_dir), *_fill(extra, files)], message, capsys,
                   list(files.values()))


IMPORT_CASES = [
    (["{missing}"], "does not exist"),
    (["{wrong_json}"], "not an lm-eval results file"),
    (["{broken_json}"], "cannot read"),
    (["{empty_dir}"], "no lm-eval results_*.json"),
    (["{empty_dir}", "--out", "{a_file}"], "is a file; it takes a results folder"),
]


@pytest.mark.parametrize("args, message", IMPORT_CASES, ids=["missing", "wrong json", "broken json", "no runs",
                                                             "out is a file"])
def test_import_lm_eval_refuses_bad_input(args, message, tmp_path, files, capsys):
    out = tmp_path / "results"
    argv = _fill(args, files)
    assert_refused(["import-lm-eval", *argv, *([] if "--out" in argv else ["--out", str(out)])], message, capsys,
                   [out, *files.values()])


MODEL_ARGS_CASES = [
    ("pretrained=x,method=snapkv,ratio=5", "ratio 5.0 is outside [0, 1)"),
    ("method=kvzap,ratio=nan", "ratio nan is not a number in [0, 1)"),
    ("method=snapkv,ratio=abc", "could not convert"),
    ("method=nope,ratio=0.5", "unknown kvbench method 'nope'"),
    ("method=snapkv,ratio=0.5,allocation=x", "unknown allocation 'x'"),
    ("method=snapkv,ratio=0.5,first_token=x", "first_token must be compressed or prefill"),
    ("method=snapkv,ratio", "expected KEY=VALUE pairs"),
    ("method=snapkv,ratio=0.5,max_gen_toks=0", "max_gen_toks must be at least 1"),
]


@pytest.mark.parametrize("model_args, message", MODEL_ARGS_CASES, ids=[c[0] for c in MODEL_ARGS_CASES])
def test_lm_eval_refuses_bad_model_args_before_lm_eval_starts(model_args, message, capsys):
    pytest.importorskip("lm_eval")
    assert_refused(["lm-eval", "--model", "kvbench", "--model_args", model_args, "--tasks", "arc_easy"], message,
                   capsys, [])


LEADERBOARD_CASES = [
    (["--port", "abc"], "argument --port: invalid int value"),
    (["--port", "0"], "--port 0 is not a TCP port"),
    (["--port", "70000"], "--port 70000 is not a TCP port"),
    (["--results", "{garbage}"], "neither a results folder nor a .parquet file"),
]


@pytest.mark.parametrize("extra, message", LEADERBOARD_CASES, ids=[" ".join(c[0]) for c in LEADERBOARD_CASES])
def test_leaderboard_refuses_bad_input(extra, message, files, capsys):
    assert_refused(["leaderboard", "--print-command", *_fill(extra, files)], message, capsys, [])


def test_leaderboard_on_an_address_in_use_is_one_line(tmp_path, capsys):
    pytest.importorskip("streamlit")
    pytest.importorskip("plotly")
    results = _results(tmp_path / "results")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_refused(["leaderboard", "--results", str(results), "--address", "127.0.0.1", "--port", str(port)],
                       "cannot serve there", capsys, [results])
    assert_refused(["leaderboard", "--results", str(results), "--address", "no.such.host.invalid"],
                   "not an address of this machine", capsys, [results])


def test_unknown_command_and_missing_command_are_one_line(capsys):
    assert_refused(["frobnicate"], "invalid choice: 'frobnicate'", capsys, [])
    assert_refused([], "the following arguments are required: command", capsys, [])


def test_an_argument_error_answers_without_importing_torch():
    """The CLI imports the engine only once the arguments are known good."""
    probe = ("import sys; from kvbench.cli import main; "
             "codes = [main(['check', '--baseline', 'a', '--candidate', 'b', '--tolerance', 'nan']), "
             "main(['run', '--method', 'window', '--ratio', 'nan']), "
             "main(['sweep', '--methods', 'window', '--ratios', '0.5,x']), "
             "main(['train', 'gated', '--texts', '0']), main(['leaderboard', '--port', '0'])]; "
             "print(codes, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "[2, 2, 2, 2, 2] False", result.stdout + result.stderr


# ---- a results folder survives crashes and misuse --------------------------------------------------


def sweep_args(model_dir: Path, out: Path, *extra: str, method: str = "window") -> list[str]:
    return ["sweep", "--model", str(model_dir), "--task", "ruler:niah_single_1,niah_single_2", "--length", "512",
            "--samples", "2", "--methods", method, "--ratios", "0.5", "--out", str(out), *extra]


def test_an_unreadable_part_file_is_set_aside_and_its_rows_recomputed(tiny_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert main(sweep_args(tiny_dir, out)) == 0
    whole = read_results(out).set_index(CELL).sort_index()["prediction"]
    part = next(out.glob("*.parquet"))
    part.write_bytes(part.read_bytes()[: len(part.read_bytes()) // 2])  # a crash or a disk fault
    (out / ".old.parquet.tmp").write_bytes(b"half written")  # what a killed writer leaves
    capsys.readouterr()
    assert main(sweep_args(tiny_dir, out)) == 0
    err = capsys.readouterr().out
    assert "is unreadable" in err and "moved to" in err
    assert (out / (part.name + ".unreadable")).is_file()  # kept for the user, no longer read
    assert not (out / ".old.parquet.tmp").exists()
    again = read_results(out).set_index(CELL).sort_index()["prediction"]
    assert again.equals(whole)  # the recomputed rows are the rows the damaged file held


def test_error_rows_are_kept_by_default_and_retried_with_retry_errors(tiny_dir, tmp_path, capsys,  # noqa: F811
                                                                      monkeypatch):
    from kvbench.methods.snapkv import SnapKV

    out = tmp_path / "out"
    real = SnapKV.score

    def broken(self, view):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(SnapKV, "score", broken)
    assert main(sweep_args(tiny_dir, out, method="snapkv")) == 0
    failed = read_results(out)["error"].notna().sum()
    assert failed == 4  # 2 subtasks × 2 samples, one question each
    monkeypatch.setattr(SnapKV, "score", real)
    capsys.readouterr()
    assert main(sweep_args(tiny_dir, out, method="snapkv")) == 0
    assert "keeping 4 rows written with an error (--retry-errors runs them again)" in capsys.readouterr().out
    assert read_results(out)["error"].notna().sum() == 4
    assert main(sweep_args(tiny_dir, out, "--retry-errors", method="snapkv")) == 0
    frame = read_results(out)
    assert frame["error"].isna().all() and not frame.duplicated(CELL).any()
    assert len(frame) == 8  # 4 samples × (full + snapkv)


def test_a_second_sweep_into_the_same_folder_is_refused_and_a_dead_ones_lock_taken_over(  # noqa: F811
        tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = sweep_args(tiny_dir, out)
    args[args.index("--samples") + 1] = "3"
    first = subprocess.Popen([sys.executable, "-m", "kvbench.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and not list(out.glob(".kvbench-lock-*")):
            time.sleep(0.05)
        assert first.poll() is None, "the first sweep ended before the second could start"
        owner = json.loads((out / ".kvbench-lock-0of1").read_text())
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()
        assert_refused(sweep_args(tiny_dir, out), f"is being written by another sweep (pid {first.pid} on", capsys,
                       [])
        assert_refused(sweep_args(tiny_dir, out, "--shard", "0/3"), "is being written by another sweep", capsys, [])
    finally:
        first.kill()  # SIGKILL: no clean-up runs, the lock stays behind with a dead pid
        first.wait()
    assert (out / ".kvbench-lock-0of1").is_file()
    assert main(args) == 0
    assert "removing the stale lock .kvbench-lock-0of1" in capsys.readouterr().out
    assert not list(out.glob(".kvbench-lock-*"))  # released on exit
    frame = read_results(out)
    assert len(frame) == 12 and not frame.duplicated(CELL).any()  # 6 samples × (full + window), once each


def test_shards_of_one_sweep_share_the_folder(tmp_path):
    from kvbench.run.sweep import FolderLock

    with FolderLock(tmp_path, (0, 2)) as first, FolderLock(tmp_path, (1, 2)) as second:
        assert first.others == 0 and second.others == 1
    assert not list(tmp_path.iterdir())


def test_nan_never_enters_a_results_file(tmp_path):
    writer = ResultsWriter(tmp_path, "part")
    row = {"model": "m", "task": "t", "subtask": "s", "sample_id": "0", "method": "full", "target_ratio": 0.0}
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="only finite numbers"):
            writer.add([{**row, "score": bad}])
    assert not list(tmp_path.iterdir())


# ---- a damaged model cache is detected by hash and rebuilt -----------------------------------------


def test_a_corrupted_cached_model_is_detected_and_converted_again(tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    import dataclasses
    import shutil

    import kvbench.models as models

    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    conversions = []

    def fake_assemble(parts, sha256, dest, log=print):  # the pinned GGUF, stood in for by the tiny model
        dest.write_bytes(b"gguf")
        return dest

    def fake_convert(gguf, alias, out):
        conversions.append(out)
        shutil.copytree(tiny_dir, out)

    monkeypatch.setattr(models, "assemble", fake_assemble)
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    monkeypatch.setitem(models.ALIASES, "tiny-alias",
                        dataclasses.replace(models.ALIASES["smollm2-135m"], licence=None))
    stale = tmp_path / "cache" / "models" / ".tiny-alias.tmp-killed"
    stale.mkdir(parents=True)
    os.utime(stale, (time.time() - 2 * models.TEMPORARY_AGE_S,) * 2)
    messages: list[str] = []
    folder = models._converted_alias("tiny-alias", messages.append)
    assert len(conversions) == 1 and (folder / models.MANIFEST).is_file() and not stale.exists()
    assert models._converted_alias("tiny-alias", messages.append) == folder and len(conversions) == 1
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte: the file still parses, the weights are wrong
    weights.write_bytes(bytes(data))
    assert models._converted_alias("tiny-alias", messages.append) == folder
    assert len(conversions) == 2
    assert any("has a corrupted model.safetensors" in m for m in messages)
    assert weights.read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    weights.unlink()  # a folder missing a file is converted again too
    models._converted_alias("tiny-alias", messages.append)
    assert len(conversions) == 3 and weights.is_file()


def test_a_corrupted_cached_wheel_is_downloaded_again(tmp_path, monkeypatch):
    import hashlib

    import kvbench.downloads as downloads

    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    payload = b"the wheel's bytes"
    wheel = downloads.PinnedWheel("some-wheel", "1.0", hashlib.sha256(payload).hexdigest())
    downloads_made = []

    def fake_pip(pinned, target_dir):
        downloads_made.append(pinned)
        (target_dir / pinned.filename).write_bytes(payload)

    monkeypatch.setattr(downloads, "_pip_download", fake_pip)
    path = downloads.fetch_wheel(wheel, log=lambda m: None)
    path.write_bytes(b"bit rot")
    assert downloads.fetch_wheel(wheel, log=lambda m: None).read_bytes() == payload
    assert len(downloads_made) == 2
    monkeypatch.setattr(downloads, "_pip_download", lambda pinned, target_dir: path.write_bytes(b"evil"))
    path.write_bytes(b"bit rot")
    with pytest.raises(downloads.DownloadError, match="refusing it"):
        downloads.fetch_wheel(wheel, log=lambda m: None)


def test_hub_files_are_pinned_to_the_first_commit_and_checked_by_sha256(tmp_path, monkeypatch):
    """The hub cannot be reached here, so it is played by a folder: the first download records the commit
    served and the file's sha256; later uses ask for that commit, and a damaged copy is fetched again."""
    import huggingface_hub

    import kvbench.downloads as downloads

    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(downloads, "_VERIFIED", {})
    served = {"commit": "c0ffee", "bytes": b"gates v1"}
    asked: list[str | None] = []

    def snapshot(repo, filename, revision):
        return tmp_path / "hub" / repo / "snapshots" / (revision or served["commit"]) / filename

    def from_cache(repo, filename, repo_type=None, revision=None):
        path = snapshot(repo, filename, revision)
        return str(path) if path.is_file() else None

    def download(repo, filename, repo_type=None, revision=None, force_download=False):
        asked.append(revision)
        path = snapshot(repo, filename, revision)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(served["bytes"])
        return str(path)

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", from_cache)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    first = downloads.hub_download("org/gates", "g.safetensors")
    assert downloads.hub_pin("org/gates")["revision"] == "c0ffee" and asked == [None]
    served.update(commit="beef", bytes=b"gates v2")  # the repo moves on: this installation keeps its commit
    assert downloads.hub_download("org/gates", "g.safetensors").read_bytes() == b"gates v1" and asked == [None]
    first.write_bytes(b"gates v1 damaged")
    served["bytes"] = b"gates v1"
    assert downloads.hub_download("org/gates", "g.safetensors").read_bytes() == b"gates v1"
    assert asked == [None, "c0ffee"]  # fetched again, at the pinned commit
    first.write_bytes(b"tampered")
    served["bytes"] = b"tampered"
    with pytest.raises(downloads.DownloadError, match="refusing it"):
        downloads.hub_download("org/gates", "g.safetensors")


@pytest.mark.parametrize("value", ["5", "nan", "-0.1", "abc", None])
def test_an_imported_lm_eval_run_with_a_ratio_outside_0_1_is_refused(value, tmp_path):
    from kvbench.integrations.lm_eval.importer import LmEvalImportError, _ratio

    with pytest.raises(LmEvalImportError, match="model_args ratio"):
        _ratio(value, tmp_path / "results_x.json")
    assert _ratio("0.5", tmp_path / "results_x.json") == 0.5
