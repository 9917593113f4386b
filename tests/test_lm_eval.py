"""kvbench as an lm-evaluation-harness model (issue 10), offline on a tiny model and local jsonl tasks.

The reference computed another way is lm-eval's own ``hf`` model on the same weights: the full
cache must answer as it does. The case built to need an evicted token: two documents that differ
only in a code early in the prompt, asked for that code at the end (generated, and as a choice
between the two codes), with ``window`` at 0.9 keeping only the sinks and the prompt's tail.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import lm_eval
import pytest
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from kvbench.cli import main
from kvbench.integrations.lm_eval.model import KVBenchLM
from kvbench.results import COLUMNS, read_results
from tiny_models import save_tiny, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["kvb_copy", "kvb_choice"]
CODES = ["magic", "special"]  # one token each (with their space): the documents differ in that token only
FILLER = " ".join(["The grass is green. The sky is blue. The sun is yellow."] * 8)


def prompt(code: str) -> str:
    return f"Remember this well, the secret code is {code}. {FILLER} What is the secret code? The code is"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder and two lm-eval tasks (generate_until, multiple_choice) on a local jsonl."""
    root = tmp_path_factory.mktemp("lm-eval")
    model = save_tiny(root / "tiny", "llama")
    docs = [{"context": prompt(code), "answer": code, "choices": CODES, "label": i} for i, code in enumerate(CODES)]
    data = root / "codes.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    tasks.mkdir()
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n" \
             'doc_to_text: "{{context}}"\n'
    (tasks / "copy.yaml").write_text(
        f"task: kvb_copy\n{common}output_type: generate_until\n" 'doc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (tasks / "choice.yaml").write_text(
        f"task: kvb_choice\n{common}output_type: multiple_choice\n"
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return {"model": model, "tasks": tasks, "manager": TaskManager(include_path=str(tasks), include_defaults=False)}


def evaluate(setup, model="kvbench", **model_args):
    results = lm_eval.simple_evaluate(
        model=model, model_args={"pretrained": str(setup["model"]), "dtype": "float32", **model_args},
        tasks=TASKS, task_manager=setup["manager"], device="cpu", batch_size=1, log_samples=True,
        bootstrap_iters=0,
    )
    return results


def responses(results) -> dict[str, list]:
    """Every document's raw responses: generated strings, (loglikelihood, is_greedy) per choice."""
    return {task: [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]
            for task in TASKS}


@pytest.fixture(scope="module")
def runs(setup):
    return {
        "full": evaluate(setup, method="full"),
        "window@0": evaluate(setup, method="window", ratio=0.0),
        "snapkv@0": evaluate(setup, method="snapkv", ratio=0.0, window_size=8),
        "window@0.9": evaluate(setup, method="window", ratio=0.9),
        "window@0.9 prefill": evaluate(setup, method="window", ratio=0.9, first_token="prefill"),
        "kvdirect@0.9": evaluate(setup, method="kvdirect", ratio=0.9),
    }


def test_the_code_is_one_token_past_the_sinks_and_before_the_window():
    tok = tiny_tokenizer()
    ids = [tok.encode(prompt(code)) for code in CODES]
    assert len(ids[0]) == len(ids[1])
    differ = [i for i, (a, b) in enumerate(zip(*ids)) if a != b]
    compressed = len(ids[0]) - 1  # the last prompt token is run after eviction
    kept_recent = compressed - round(0.9 * compressed) - 4  # window at 0.9: 4 sinks + the newest
    assert len(differ) == 1 and 4 <= differ[0] < compressed - kept_recent
    for code in CODES:  # each choice is a one-token continuation
        assert tok.encode(prompt(CODES[0]) + " " + code)[:-1] == ids[0]


def test_full_cache_answers_as_lm_evals_own_hf_model(setup, runs):
    ours, theirs = responses(runs["full"]), responses(evaluate(setup, model="hf"))
    assert ours["kvb_copy"] == theirs["kvb_copy"]
    for our_doc, their_doc in zip(ours["kvb_choice"], theirs["kvb_choice"]):
        for [(ll, greedy)], [(their_ll, their_greedy)] in zip(our_doc, their_doc):
            assert ll == pytest.approx(their_ll, abs=1e-4) and greedy == their_greedy


def test_any_method_at_ratio_zero_gives_the_full_cache_results(runs):
    full = responses(runs["full"])
    assert responses(runs["window@0"]) == full
    assert responses(runs["snapkv@0"]) == full
    assert runs["window@0"]["results"] == runs["full"]["results"]


def test_kvdirect_recomputes_the_code_and_answers_as_the_full_cache(runs):
    full, kvdirect = responses(runs["full"]), responses(runs["kvdirect@0.9"])
    assert kvdirect["kvb_copy"] == full["kvb_copy"]
    for our_doc, full_doc in zip(kvdirect["kvb_choice"], full["kvb_choice"]):
        for [(ll, greedy)], [(full_ll, full_greedy)] in zip(our_doc, full_doc):
            assert ll == pytest.approx(full_ll, abs=1e-4) and greedy == full_greedy
    per_doc = runs["kvdirect@0.9"]["config"]["kvbench"]["per_doc"]["kvb_copy"].values()
    assert all(d["measured_ratio"] == pytest.approx(0.9, abs=0.01) for d in per_doc)
    assert all(d["kv_bytes_physical"] > d["kv_bytes_full"] for d in per_doc)  # residuals as big as K/V here


def test_evicting_the_code_changes_the_results(runs):
    full, evicted = responses(runs["full"]), responses(runs["window@0.9"])
    for task in TASKS:  # every document's answer changes once its early tokens are gone
        assert all(a != b for a, b in zip(full[task], evicted[task])), task
    per_doc = runs["window@0.9"]["config"]["kvbench"]["per_doc"]
    for task in TASKS:
        assert all(d["measured_ratio"] == pytest.approx(0.9, abs=0.01) for d in per_doc[task].values())


def test_first_token_from_the_prefill_leaves_one_token_answers_unchanged(runs):
    """With first_token=prefill the logits of the first answer token come from the full prefill:
    one-token choices score exactly as with the full cache; generated tokens after the first differ."""
    full, evicted = responses(runs["full"]), responses(runs["window@0.9 prefill"])
    for ours, theirs in zip(evicted["kvb_choice"], full["kvb_choice"]):
        assert [r[0][0] for r in ours] == pytest.approx([r[0][0] for r in theirs], abs=1e-4)
    assert evicted["kvb_copy"] != full["kvb_copy"]


@pytest.fixture(scope="module")
def cli_run(setup, tmp_path_factory):
    """`kvbench lm-eval ...`: lm-eval's own command line with kvbench's model registered."""
    out = tmp_path_factory.mktemp("lm-eval-out")
    model_args = f"pretrained={setup['model']},dtype=float32,method=window,ratio=0.9"
    argv = sys.argv
    try:
        code = main(["lm-eval", "--model", "kvbench", "--model_args", model_args, "--tasks", ",".join(TASKS),
                     "--include_path", str(setup["tasks"]), "--device", "cpu", "--output_path", str(out),
                     "--log_samples"])
    finally:
        sys.argv = argv
    assert code == 0
    return out


def copy_run(run: Path, to: Path, edit=lambda results: None) -> Path:
    """The run's results JSON (edited) and samples files under a new folder; returns the JSON."""
    to.mkdir()
    results_file = next(run.rglob("results_*.json"))
    results = json.loads(results_file.read_text())
    edit(results)
    (to / results_file.name).write_text(json.dumps(results))
    for samples in run.rglob("samples_*.jsonl"):
        (to / samples.name).write_text(samples.read_text())
    return to / results_file.name


def test_lm_eval_cli_run_imports_as_leaderboard_rows(setup, cli_run, tmp_path, capsys):
    out = cli_run
    results_file = next(out.rglob("results_*.json"))
    samples = {t: [json.loads(line) for line in next(out.rglob(f"samples_{t}_*.jsonl")).read_text().splitlines()]
               for t in TASKS}

    board = tmp_path / "results"
    assert main(["import-lm-eval", str(out), "--out", str(board)]) == 0
    assert main(["import-lm-eval", str(results_file), "--out", str(board)]) == 0  # same run: same part file
    frame = read_results(board)
    assert list(frame.columns) == COLUMNS
    assert len(frame) == 4 and frame["run_id"].nunique() == 1  # 2 tasks × 2 documents, imported once
    assert set(frame["task"]) == {"lm-eval/kvb_copy", "lm-eval/kvb_choice"}
    assert set(frame["subtask"]) == set(TASKS)
    assert (frame["method"] == "window").all() and (frame["target_ratio"] == 0.9).all()
    assert frame["query_aware"].all() and (frame["model"] == str(setup["model"])).all()
    assert ((frame["measured_ratio"] - 0.9).abs() < 0.01).all() and (frame["context_tokens"] > 100).all()
    for task, metric in (("kvb_choice", "acc"), ("kvb_copy", "exact_match")):
        rows = frame[frame["subtask"] == task].sort_values("sample_id")
        assert list(rows["sample_id"]) == ["0", "1"] and (rows["metric"] == metric).all()
        by_doc = {str(s["doc_id"]): s for s in samples[task]}
        assert list(rows["score"]) == [100.0 * by_doc[i][metric] for i in rows["sample_id"]]
        assert [json.loads(ref) for ref in rows["reference"]] == [[CODES[int(i)]] for i in rows["sample_id"]]
    copy = frame[frame["subtask"] == "kvb_copy"].sort_values("sample_id")
    generated = [s["filtered_resps"][0] for s in sorted(samples["kvb_copy"], key=lambda s: s["doc_id"])]
    assert list(copy["prediction"]) == generated
    assert copy["command"].iloc[0].startswith("kvbench lm-eval --model kvbench --model_args pretrained=")

    # a samples file alone imports its task's rows (the results JSON beside it names method and ratio)
    one = tmp_path / "one"
    assert main(["import-lm-eval", str(next(out.rglob("samples_kvb_copy_*.jsonl"))), "--out", str(one)]) == 0
    assert set(read_results(one)["subtask"]) == {"kvb_copy"}

    from kvbench.leaderboard_app import data
    loaded = data.load(board)
    assert not loaded.skipped and len(loaded.frame) == 4
    table = data.leaderboard(loaded.frame)
    assert list(table["method"]) == ["window"] and table["samples"].iloc[0] == 4


def test_import_refuses_what_it_cannot_use(cli_run, tmp_path, capsys):
    """A run of another lm-eval model, and a run without --log_samples: one line, exit 2, nothing written."""
    other = copy_run(cli_run, tmp_path / "hf", lambda results: results["config"].update(model="hf"))
    assert main(["import-lm-eval", str(other), "--out", str(tmp_path / "r")]) == 2
    assert "only --model kvbench runs" in capsys.readouterr().err
    lonely = copy_run(cli_run, tmp_path / "no-samples")
    for samples in lonely.parent.glob("samples_*.jsonl"):
        samples.unlink()
    assert main(["import-lm-eval", str(lonely), "--out", str(tmp_path / "r")]) == 2
    assert "--log_samples" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_first_token_prefill_run_is_a_variant_of_its_own(cli_run, tmp_path):
    def prefill(results):
        results["config"]["kvbench"]["first_token"] = "prefill"

    board = tmp_path / "results"
    assert main(["import-lm-eval", str(copy_run(cli_run, tmp_path / "a")), "--out", str(board)]) == 0
    assert main(["import-lm-eval", str(copy_run(cli_run, tmp_path / "b", prefill)), "--out", str(board)]) == 0
    configs = {c: json.loads(c).get("first_token") for c in read_results(board)["method_config"]}
    assert sorted(configs.values(), key=str) == [None, "prefill"]


def test_bad_model_args_are_one_clear_error(setup):
    model = str(setup["model"])
    with pytest.raises(ValueError, match="unknown kvbench method 'snap'"):
        KVBenchLM(pretrained=model, method="snap", ratio=0.5)
    with pytest.raises(ValueError, match="outside"):
        KVBenchLM(pretrained=model, method="window", ratio=1.0)
    with pytest.raises(ValueError, match="evicts nothing"):
        KVBenchLM(pretrained=model, method="full", ratio=0.5)
    with pytest.raises(ValueError, match="unknown allocation 'per-head'"):
        KVBenchLM(pretrained=model, method="snapkv", ratio=0.5, allocation="per-head")
    with pytest.raises(ValueError, match="no field 'windowsize'"):
        KVBenchLM(pretrained=model, method="snapkv", ratio=0.5, windowsize=8)
    with pytest.raises(ValueError, match="kvzap evicts by threshold and measures the ratio"):
        KVBenchLM(pretrained=model, method="kvzap", ratio=0.5)
    with pytest.raises(ValueError, match="finch's window is the question"):  # lm-eval prompts do not mark it
        KVBenchLM(pretrained=model, method="finch", ratio=0.5)


def test_rolling_loglikelihood_is_refused_with_the_reason(setup):
    lm = KVBenchLM(pretrained=str(setup["model"]), method="window", ratio=0.5, dtype="float32")
    request = Instance("loglikelihood_rolling", {}, ("some text",), 0)
    with pytest.raises(NotImplementedError, match="no prompt to compress"):
        lm.loglikelihood_rolling([request])


def test_pyproject_registers_the_model_in_lm_evals_plugin_group():
    """lm-eval releases with plugin discovery read the `lm_eval.models` entry points by themselves."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project.get("entry-points", {}).get("lm_eval.models", {}).get("kvbench")
    assert target == "kvbench.integrations.lm_eval.model:KVBenchLM"
    assert lm_eval.api.registry.get_model("kvbench") is KVBenchLM
