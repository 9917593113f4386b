"""`kvbench check`: pass on an unchanged candidate, fail on a planted regression (naming the cell),
report missing/extra cells and config mismatches, let noise inside the interval pass, flag memory,
and time only on the same device; and the CI workflow runs the same commands as `.ci/run`."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from kvbench.cli import main
from kvbench.results import ResultsWriter

ROOT = Path(__file__).resolve().parents[1]
CI_SWEEP = ["sweep", "--methods", "gated,snapkv", "--ratios", "0.5,0.7", "--task", "ruler:niah_single_1",
            "--samples", "2", "--length", "1024", "--dtype", "float32"]


def make_rows(cells=(("snapkv", 0.5), ("window", 0.5)), samples=8, questions=2, score=100.0, **overrides):
    """Rows for (full + cells) × samples × questions; ``score`` may be a function of (method, ratio, s, q)."""
    rows = []
    for method, ratio in [("full", 0.0), *cells]:
        for s in range(samples):
            for q in range(questions):
                value = score(method, ratio, s, q) if callable(score) else score
                rows.append({
                    "run_id": "r", "device": "cpu", "dtype": "float32", "model": "tiny", "task": "ruler",
                    "subtask": "niah_single_1", "requested_length": 512, "context_tokens": 500,
                    "sample_id": f"s{s}", "question_id": f"q{q}", "method": method,
                    "method_config": json.dumps({"window_size": 64}), "allocation": "uniform",
                    "query_aware": False, "prefill_chunk": 512, "evict_during_prefill": False,
                    "decode_interval": 128, "target_ratio": ratio, "measured_ratio": ratio,
                    "kv_bytes_full": 1000, "kv_bytes_kept": int(1000 * (1 - ratio)),
                    "kv_bytes_physical": int(1000 * (1 - ratio)), "peak_mem_bytes": 2000, "peak_mem_kind": "kv_cache",
                    "prefill_s": 0.5, "scoring_s": 0.1, "decode_s": 0.4, "new_tokens": 8, "metric": "string_match_all",
                    "score": value, "token_match": value / 100, "seed": 0, "error": None,
                })
    for row in rows:
        for column, value in overrides.items():
            row[column] = value(row) if callable(value) else value
    return rows


def write(folder: Path, rows: list[dict]) -> Path:
    ResultsWriter(folder, "part").add(rows)
    return folder


def check(capsys, baseline, candidate, *extra):
    code = main(["check", "--baseline", str(baseline), "--candidate", str(candidate), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unchanged_candidate_passes(tmp_path, capsys):
    rows = make_rows()
    code, out, _ = check(capsys, write(tmp_path / "b", rows), write(tmp_path / "c", rows))
    assert code == 0, out
    assert out.startswith("kvbench check: PASS: 3 cells (3 ok)")


def test_planted_score_regression_fails_and_names_the_cell(tmp_path, capsys):
    base = write(tmp_path / "b", make_rows())
    # snapkv now evicts the needle in 6 of 8 samples: 100 -> 25 points
    cand = write(tmp_path / "c", make_rows(score=lambda m, r, s, q: 0.0 if m == "snapkv" and s < 6 else 100.0))
    code, out, _ = check(capsys, base, cand)
    assert code == 1
    assert "FAIL" in out.splitlines()[0]
    failing = out.split("failing cells:")[1]
    assert "tiny ruler:niah_single_1 snapkv@0.5: score -75.0 points" in failing
    assert "window" not in failing and "full" not in failing


def test_two_specs_of_one_method_are_two_cells(tmp_path, capsys):
    """kvzap at τ = -3 and τ = -5 (ratio measured, so no target ratio) are compared separately: a
    regression at one threshold is named with its spec, not averaged away with the other."""
    def rows(drop_at_minus_3: bool) -> list[dict]:
        out = [r for r in make_rows(cells=()) if r["method"] == "full"]
        for tau in (-3.0, -5.0):
            for r in make_rows(cells=(("kvzap", 0.5),)):
                if r["method"] != "kvzap":
                    continue
                dropped = drop_at_minus_3 and tau == -3.0 and r["sample_id"] in {f"s{i}" for i in range(6)}
                out.append({**r, "target_ratio": None, "method_spec": f"kvzap:threshold={tau}",
                            "method_config": json.dumps({"threshold": tau}), "score": 0.0 if dropped else 100.0})
        return out

    base = write(tmp_path / "b", rows(False))
    assert check(capsys, base, base)[0] == 0
    code, out, _ = check(capsys, base, write(tmp_path / "c", rows(True)))
    assert code == 1
    failing = out.split("failing cells:")[1]
    assert "tiny ruler:niah_single_1 kvzap:threshold=-3.0@τ: score -75.0 points" in failing
    assert "threshold=-5.0" not in failing and "duplicate" not in out


def test_noise_within_the_interval_passes(tmp_path, capsys):
    base = write(tmp_path / "b", make_rows(score=lambda m, r, s, q: 100.0 if (s + q) % 3 else 0.0))
    # one sample flips down, another up, a third flips one question down: the interval straddles 0
    flips = {(1, 0): 100.0, (2, 0): 0.0, (4, 1): 0.0}
    cand = write(tmp_path / "c", make_rows(
        score=lambda m, r, s, q: flips.get((s, q), 100.0 if (s + q) % 3 else 0.0) if m == "snapkv"
        else (100.0 if (s + q) % 3 else 0.0)))
    code, out, _ = check(capsys, base, cand)
    assert code == 0, out
    line = next(l for l in out.splitlines() if "snapkv@0.5" in l)
    low, high = map(float, re.search(r"\[([-+\d.]+), ([-+\d.]+)\]", line).groups())
    assert low < 0 < high or (low < 0 and high >= -5)
    # a real drop of the same size on every sample fails
    cand2 = write(tmp_path / "c2", make_rows(score=lambda m, r, s, q: 0.0 if m == "snapkv" and q == 0 else
                                             (100.0 if (s + q) % 3 else 0.0)))
    assert check(capsys, base, cand2)[0] == 1


def test_missing_and_extra_cells_are_reported(tmp_path, capsys):
    base = write(tmp_path / "b", make_rows(cells=(("snapkv", 0.5), ("window", 0.5))))
    cand = write(tmp_path / "c", make_rows(cells=(("snapkv", 0.5), ("h2o", 0.5)), samples=7))
    code, out, _ = check(capsys, base, cand)
    assert code == 1
    assert re.search(r"missing\s+tiny ruler:niah_single_1 window@0.5", out, re.IGNORECASE)
    assert re.search(r"extra\s+tiny ruler:niah_single_1 h2o@0.5", out)
    assert "2 (sample, question) pairs missing from the candidate" in out  # sample s7 in snapkv and full
    # extra cells alone do not fail
    code, out, _ = check(capsys, base, write(tmp_path / "c2", make_rows(
        cells=(("snapkv", 0.5), ("window", 0.5), ("h2o", 0.5)))))
    assert code == 0 and "extra" in out


def test_config_mismatch_is_reported(tmp_path, capsys):
    base = write(tmp_path / "b", make_rows())
    cand = write(tmp_path / "c", make_rows(
        allocation=lambda r: "global" if r["method"] == "snapkv" else r["allocation"],
        method_config=lambda r: json.dumps({"window_size": 32}) if r["method"] == "snapkv" else r["method_config"]))
    code, out, _ = check(capsys, base, cand, "--format", "json")
    assert code == 1
    report = json.loads(out)
    assert report["passed"] is False and report["failing"] == ["tiny ruler:niah_single_1 snapkv@0.5"]
    cell = next(c for c in report["cells"] if c["name"] == report["failing"][0])
    assert cell["status"] == "config"
    assert any("allocation: uniform → global" in f for f in cell["failures"])
    assert any("method_config" in f and "32" in f for f in cell["failures"])


def test_memory_regressions_fail_time_only_on_the_same_device(tmp_path, capsys):
    base = write(tmp_path / "b", make_rows())
    fatter = write(tmp_path / "c", make_rows(
        kv_bytes_physical=lambda r: r["kv_bytes_physical"] * 2 if r["method"] == "window" else r["kv_bytes_physical"],
        peak_mem_bytes=lambda r: 2300 if r["method"] == "snapkv" else 2000))
    code, out, _ = check(capsys, base, fatter, "--format", "markdown")
    assert code == 1
    assert "- `tiny ruler:niah_single_1 window@0.5`: kv_bytes_physical 500 → 1000 (+100%)" in out
    assert "- `tiny ruler:niah_single_1 snapkv@0.5`: peak_mem_bytes 2000 → 2300 (+15%)" in out
    assert out.startswith("### kvbench check: FAIL") and "| status | cell |" in out
    # 5% more peak is within the default 10%
    assert check(capsys, base, write(tmp_path / "c5", make_rows(peak_mem_bytes=2100)))[0] == 0

    slow = make_rows(decode_s=lambda r: 4.0 if r["method"] == "snapkv" else 0.4)
    code, out, _ = check(capsys, base, write(tmp_path / "slow", slow))
    assert code == 0 and re.search(r"warning\s+tiny ruler:niah_single_1 snapkv@0.5", out)
    assert "time 1 s → 4.6 s (+360%) on cpu" in out
    code, out, _ = check(capsys, base, tmp_path / "slow", "--strict-time")
    assert code == 1 and "snapkv@0.5: time 1 s → 4.6 s" in out
    # a different device: time is not compared at all
    other = write(tmp_path / "gpu", make_rows(device="cuda:0", decode_s=40.0))
    code, out, _ = check(capsys, base, other, "--strict-time")
    assert code == 0 and "time not compared: device cpu vs cuda:0" in out
    # normal timing noise (±40%) never warns
    noisy = write(tmp_path / "noisy", make_rows(decode_s=lambda r: 0.4 * (1.4 if r["sample_id"] < "s4" else 0.6)))
    code, out, _ = check(capsys, base, noisy, "--strict-time")
    assert code == 0 and "warning" not in out


def test_candidate_errors_fail_and_are_named(tmp_path, capsys):
    base = write(tmp_path / "b", make_rows())
    cand = write(tmp_path / "c", make_rows(
        error=lambda r: "CUDA out of memory" if r["method"] == "window" and r["sample_id"] == "s0" else None))
    code, out, _ = check(capsys, base, cand)
    assert code == 1
    assert "window@0.5: 2 candidate rows with an error (CUDA out of memory)" in out


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    base = write(tmp_path / "b", make_rows())
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.parquet").write_text("not parquet")
    for args, message in [
        ((tmp_path / "nope", base), "does not exist"),
        ((base, tmp_path / "empty"), "holds no .parquet files"),
        ((base, tmp_path / "junk"), "is not readable"),
        ((base, base, "--metric", "rouge"), "--metric takes score, token_match"),
    ]:
        code, out, err = check(capsys, *args)
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and message in err, err


def test_output_appends_the_report(tmp_path, capsys):
    rows = make_rows()
    summary = tmp_path / "summary.md"
    summary.write_text("# before\n")
    code, out, _ = check(capsys, write(tmp_path / "b", rows), write(tmp_path / "c", rows),
                         "--format", "markdown", "--output", str(summary))
    assert code == 0 and summary.read_text() == "# before\n" + out


# --- end to end on the tiny model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", max_position_embeddings=2048)


def tiny_sweep(tiny_dir, out, *extra):
    args = ["sweep", "--model", str(tiny_dir), "--methods", "snapkv,window", "--ratios", "0.5",
            "--task", "ruler:niah_single_1", "--length", "512", "--samples", "2", "--out", str(out), *extra]
    assert main(args) == 0


def test_tiny_model_rerun_passes_and_a_changed_config_is_reported(tiny_dir, tmp_path, capsys):
    tiny_sweep(tiny_dir, tmp_path / "b")
    tiny_sweep(tiny_dir, tmp_path / "c")
    capsys.readouterr()
    code, out, _ = check(capsys, tmp_path / "b", tmp_path / "c", "--metric", "score,token_match")
    assert code == 0, out  # greedy decoding on the CPU is deterministic: identical scores and token matches
    assert "(+0.0 [+0.0, +0.0])" in out

    tiny_sweep(tiny_dir, tmp_path / "g", "--allocation", "global")
    capsys.readouterr()
    code, out, _ = check(capsys, tmp_path / "b", tmp_path / "g")
    assert code == 1
    for method in ("snapkv", "window"):
        assert re.search(method + r"@0.5: config method_config: .*; config allocation: uniform → global", out), out


# --- the planted regression on the default model (what CI runs) --------------------------------

@pytest.mark.real_model
def test_planted_regression_on_the_default_model_fails_against_the_committed_baseline(tmp_path, capsys, monkeypatch):
    """Fast KVzip's gates inverted evict the tokens they should keep: the needle is lost."""
    from kvbench.core.method import METHODS
    from kvbench.plugins import list_methods

    list_methods()
    gated = METHODS["gated"]
    right = gated.score
    monkeypatch.setattr(gated, "score", lambda self, view: -right(self, view))
    assert main([*CI_SWEEP, "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    code, out, _ = check(capsys, ROOT / "results" / "baseline", tmp_path / "c")
    assert code == 1
    failing = out.split("failing cells:")[1]
    assert "smollm2-135m ruler:niah_single_1 gated@0.7: score -100.0 points" in failing
    assert "snapkv" not in failing and "full@0" not in failing


# --- the workflow runs what .ci/run runs -------------------------------------------------------------

def ci_commands(text: str) -> list[list[str]]:
    """Commands of a shell script worth comparing: pip installs, pytest and kvbench, split on ``&&``."""
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            words = shlex.split(part.strip())
            if words and (words[0] == "kvbench" or words[:2] == ["pip", "install"] or words[:3] == ["python", "-m", "pytest"]):
                commands.append(words)
    return commands


def workflow_commands(workflow: dict) -> list[list[str]]:
    runs = [step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]
    return [c for run in runs for c in ci_commands(run)]


def test_workflow_is_valid_yaml_and_runs_what_ci_run_runs():
    assert_workflow_agrees((ROOT / ".ci" / "run").read_text())


def assert_workflow_agrees(ci_run: str) -> None:
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "kvbench.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "pull_request" in triggers
    steps = [s for job in workflow["jobs"].values() for s in job["steps"]]
    uses = {s["uses"].split("@")[0] for s in steps if "uses" in s}
    assert {"actions/checkout", "actions/setup-python", "actions/cache", "actions/upload-artifact"} <= uses

    ci = ci_commands(ci_run)
    words = [c[:2] for c in ci]
    assert ["pip", "install"] in words and ["python", "-m"] in words
    assert ["kvbench", "sweep"] in words and ["kvbench", "check"] in words
    in_workflow = workflow_commands(workflow)
    for command in ci:  # the workflow may add output options (--format markdown --output ...), nothing else
        assert any(w[:len(command)] == command for w in in_workflow), f"not in the workflow: {shlex.join(command)}"
    for command in in_workflow:
        assert any(command[:len(c)] == c for c in ci), f"not in .ci/run: {shlex.join(command)}"
    check_line = next(c for c in in_workflow if c[:2] == ["kvbench", "check"])
    assert "$GITHUB_STEP_SUMMARY" in check_line
    sweep = next(c for c in ci if c[:2] == ["kvbench", "sweep"])
    assert sweep[1:-2] == CI_SWEEP  # the committed baseline was made by this very sweep
    assert (ROOT / "results" / "baseline" / "README.md").read_text().count(" ".join(["kvbench", *CI_SWEEP])) >= 1


def test_macro_cell_over_subtasks(tmp_path, capsys):
    """Two subtasks: each has its own cell, and the task gets the macro mean of their differences."""
    def rows(drop_a: int, drop_b: int) -> list[dict]:
        # snapkv loses the first `drop` samples of each subtask (100 -> 0); subtask b has 4 samples, a has 8
        a = make_rows(cells=(("snapkv", 0.5),), samples=8,
                      score=lambda m, r, s, q: 0.0 if m == "snapkv" and s < drop_a else 100.0)
        b = make_rows(cells=(("snapkv", 0.5),), samples=4, subtask="niah_single_2",
                      score=lambda m, r, s, q: 0.0 if m == "snapkv" and s < drop_b else 100.0)
        return a + b

    base = write(tmp_path / "b", rows(0, 0))
    code, out, _ = check(capsys, base, write(tmp_path / "c", rows(2, 0)), "--format", "json")
    report = json.loads(out)
    macro = {c["name"]: c for c in report["cells"] if c["macro"]}
    assert set(macro) == {"tiny ruler (macro of 2 subtasks) snapkv@0.5", "tiny ruler (macro of 2 subtasks) full@0"}
    (score,) = macro["tiny ruler (macro of 2 subtasks) snapkv@0.5"]["metrics"]
    # by hand: subtask a loses 2 of 8 samples (-25), b nothing (0): the macro mean is -12.5, not the
    # pooled -2/12 x 100 = -16.7
    assert score["diff"] == pytest.approx(-12.5) and score["samples"] == 12 and score["pairs"] == 24
    assert score["low"] <= -12.5 <= score["high"]
    # losing 3 of 4 in b and 6 of 8 in a: -75 on both, beyond the tolerance
    code, out, _ = check(capsys, base, write(tmp_path / "c2", rows(6, 3)))
    assert code == 1 and "tiny ruler (macro of 2 subtasks) snapkv@0.5: score macro -75.0 points" in out
