"""`kvbench sweep`: one prefill for every cell gives the rows separate runs give; resumable; shardable."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from kvbench.cli import main
from kvbench.results import read_results
from kvbench.run.sweep import parse_shard, shard_from_environment
from test_cli import tiny_dir  # noqa: F401  (module fixture: a saved tiny Llama)

CELL = ["sample_id", "question_id", "method", "target_ratio"]
SAME = ["prediction", "score", "token_match", "measured_ratio", "kv_bytes_physical", "new_tokens", "peak_mem_bytes"]


def common(model_dir, out, samples=3):
    return ["--model", str(model_dir), "--task", "ruler:niah_single_1,niah_single_2", "--length", "512",
            "--samples", str(samples), "--out", str(out)]


def table(out):
    frame = read_results(out)
    assert not frame.duplicated(CELL).any(), "a cell was written twice"
    return frame.set_index(CELL).sort_index()[SAME]


def test_sweep_rows_equal_separate_runs(tiny_dir, tmp_path):  # noqa: F811
    """Peak memory included: a row counts its own method's scoring inputs and scoring forwards (kvzip's),
    not those of the other methods sharing the prefill. Cells are answered one at a time: a batch's
    rows count the whole batch's memory, and in bf16 (the default dtype on AVX-512 CPUs) a batch
    rounds differently (test_batched_decoding.py checks batching against this path in float32)."""
    sweep_out, runs_out = tmp_path / "sweep", tmp_path / "runs"
    assert main(["sweep", "--methods", "kvzip,window,snapkv,h2o", "--ratios", "0.25,0.75", "--decode-batch", "1",
                 *common(tiny_dir, sweep_out)]) == 0
    for method in ("kvzip", "window", "snapkv", "h2o"):
        for ratio in ("0.25", "0.75"):
            assert main(["run", "--method", method, "--ratio", ratio, "--decode-batch", "1",
                         *common(tiny_dir, runs_out)]) == 0
    swept = table(sweep_out)
    separate = read_results(runs_out).drop_duplicates(CELL).set_index(CELL).sort_index()[SAME]  # full rows repeat per run
    assert len(swept) == 6 * (1 + 4 * 2)  # 6 samples × (full + 4 methods × 2 ratios)
    assert swept.equals(separate)


def test_killed_sweep_resumes_to_exactly_the_uninterrupted_rows(tiny_dir, tmp_path):  # noqa: F811
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ["sweep", "--methods", "window,random", "--ratios", "0.5,0.9", *common(tiny_dir, killed, samples=8)]
    process = subprocess.Popen([sys.executable, "-m", "kvbench.cli", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:  # kill once some but not all samples are written
        files = list(killed.glob("*.parquet")) if killed.exists() else []
        if files and 0 < len(read_results(killed)) < 16 * 5:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    partial = len(read_results(killed))
    assert main(args) == 0  # same command again: resumes
    resumed = table(killed)
    assert len(resumed) > partial
    assert main(["sweep", "--methods", "window,random", "--ratios", "0.5,0.9", *common(tiny_dir, whole, samples=8)]) == 0
    assert resumed.equals(table(whole))
    assert main(args) == 0  # a third time: nothing left to do, nothing duplicated
    assert table(killed).equals(resumed)


def test_two_shards_together_equal_one_unsharded_sweep(tiny_dir, tmp_path):  # noqa: F811
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    grid = ["--methods", "window", "--ratios", "0.5"]
    assert main(["sweep", *grid, *common(tiny_dir, whole)]) == 0
    assert main(["sweep", *grid, "--shard", "0/2", *common(tiny_dir, sharded)]) == 0
    assert main(["sweep", *grid, "--shard", "1/2", *common(tiny_dir, sharded)]) == 0
    assert len(list(sharded.glob("*.parquet"))) == 2  # one part file per process
    assert table(sharded).equals(table(whole))


def test_a_sweep_takes_the_subtasks_in_turn(tiny_dir, tmp_path, capsys):  # noqa: F811
    """Stopped part-way, a sweep has as many samples of each subtask (give or take one)."""
    assert main(["sweep", "--methods", "window", "--ratios", "0.5", *common(tiny_dir, tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    order = re.findall(r"\] ruler:(niah_single_\d) ", captured.out + captured.err)
    assert order == ["niah_single_1", "niah_single_2"] * 3


def test_a_sweep_into_rows_of_another_dtype_says_so(tiny_dir, tmp_path, capsys):  # noqa: F811
    """The CPU's default dtype depends on the machine: resuming a folder in another dtype starts afresh,
    and the sweep says so in one line, naming the --dtype that resumes the rows already there."""
    grid = ["sweep", "--methods", "window", "--ratios", "0.5", *common(tiny_dir, tmp_path / "out", samples=1)]
    assert main([*grid, "--dtype", "float32"]) == 0
    capsys.readouterr()
    assert main([*grid, "--dtype", "float32", "--samples", "2"]) == 0
    same = capsys.readouterr()
    assert "already holds" not in same.out + same.err
    assert main([*grid, "--dtype", "bfloat16"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "already holds" in line]
    assert len(lines) == 1 and "float32 rows" in lines[0] and "--dtype float32 resumes them" in lines[0]
    assert set(read_results(tmp_path / "out")["dtype"]) == {"float32", "bfloat16"}


def test_shard_comes_from_the_launchers_environment():
    assert shard_from_environment({}) == (0, 1)
    assert shard_from_environment({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == (3, 8)
    assert shard_from_environment({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4",
                                   "SLURM_ARRAY_TASK_MIN": "2"}) == (3, 4)
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "x", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    from kvbench.methods.snapkv import SnapKV

    def broken(self, view):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(SnapKV, "score", broken)
    out = tmp_path / "out"
    assert main(["sweep", "--methods", "snapkv,window", "--ratios", "0.5", *common(tiny_dir, out, samples=1)]) == 0
    frame = read_results(out)
    failed = frame[frame["method"] == "snapkv"]
    assert len(failed) == 2 and failed["error"].str.contains("out of memory").all() and failed["score"].isna().all()
    assert frame[frame["method"] == "window"]["error"].isna().all()


def test_bad_sweep_input(tiny_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert main(["sweep", "--methods", "snapkv", "--ratios", "0.5,1.5", *common(tiny_dir, out)]) == 2
    assert main(["sweep", "--methods", "snapkv", "--ratios", "0.5", "--shard", "2/2", *common(tiny_dir, out)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "ratio 1.5 is outside" in errors[0] and "--shard 2/2" in errors[1]
    assert not out.exists()
