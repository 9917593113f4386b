"""code (lcc, repobench-p, the offline stdlib task) and math (GSM8K in KVzip's split, the
long-reasoning sets): sample construction, determinism, metrics, data routes and bad inputs."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from kvbench.cli import main
from kvbench.results import read_results
from kvbench.tasks import code as code_task
from kvbench.plugins import get_task
from kvbench.tasks import longbench as lb
from kvbench.tasks import math as math_task
from kvbench.core.task import cut_at_stop
from kvbench.tasks.metrics import edit_sim, gsm8k_extract, gsm8k_flexible_extract, math_verify_match, score
from tiny_models import save_tiny, tiny_tokenizer

LCC_ROW = {"input": "", "context": "import os\n\ndef f(x):\n", "answers": ["    return os.path.join(x)"],
           "length": 5, "dataset": "lcc", "language": "python", "all_classes": None, "_id": "lcc0"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- stdlib


def test_cut_lines_pick_whole_statement_lines():
    source = textwrap.dedent('''\
        """Module docstring."""
        import os
        x = [1,
             2]
        def function(a, b):
            """Doc."""
            total = a + b  # comment
            value = a // b
            result = a + b
            if result and value:
                return result
            return some_call(a,
                             b)
        print("x"); print("y")
        ''')
    lines = source.splitlines()
    picked = [lines[i].strip() for i in code_task.cut_lines(source)]
    # no docstrings, comments, "//", statements spread over lines, or a second statement on a line
    assert picked == ["import os", "def function(a, b):", "result = a + b", "if result and value:",
                      "return result", 'print("x"); print("y")']
    assert code_task.cut_lines("def broken(:\n") == []


def test_stdlib_samples_are_next_line_questions_from_real_files(tok):
    task = get_task("code")
    assert "stdlib" not in task.unavailable()
    samples = list(task.samples(["stdlib"], 3, tok, 700, seed=0))
    assert len(samples) == 3 and len({s.meta["file"] for s in samples}) == 3
    root = code_task.stdlib_root()
    head, tail = lb.split_template("lcc")
    for s in samples:
        q = s.questions[0]
        assert (s.subtask, s.metric, s.max_new_tokens, s.chat_template) == ("stdlib", "edit_sim", 64, False)
        assert q.text == tail == "Next line of code:\n"
        lines = (root / s.meta["file"]).read_text(encoding="utf-8").splitlines(keepends=True)
        cut = s.meta["line"] - 1
        assert q.references == [lines[cut].rstrip()]
        before = "".join(lines[:cut])
        assert s.context.startswith(head) and before.endswith(s.context[-150:])  # ends right before the line
        assert before.startswith(s.context[len(head):len(head) + 150])  # and starts with the file
        n = count(tok, s.context + q.text)
        assert 700 - 64 - 8 <= n <= 700 - 64  # filled to the budget, middle cut
        assert s.meta["truncated"] and s.meta["python"].startswith(f"{sys.version_info.major}.")
    again = list(task.samples(["stdlib"], 3, tok, 700, seed=0))
    assert [(s.sample_id, s.context) for s in again] == [(s.sample_id, s.context) for s in samples]
    other = list(task.samples(["stdlib"], 3, tok, 700, seed=1))
    assert {s.sample_id for s in other} != {s.sample_id for s in samples}


def test_stdlib_max_context_and_too_few_files(tok, tmp_path):
    task = get_task("code")
    task.max_context = 400
    [s] = task.samples(["stdlib"], 1, tok, 4096, seed=0)
    assert s.meta["budget"] == 400 and count(tok, s.context + s.questions[0].text) <= 400
    body = "".join(f"value_{i} = compute({i}, {i + 1})\n" for i in range(1200))  # ~36 KB
    (tmp_path / "one.py").write_text(body)
    (tmp_path / "small.py").write_text("x = 1\n")
    [only] = code_task.stdlib_samples(1, tok, 500, 0, root=tmp_path)
    assert only.meta["file"] == "one.py" and only.questions[0].references[0].startswith("value_")
    with pytest.raises(ValueError, match="found only 1 standard-library files"):
        list(code_task.stdlib_samples(2, tok, 500, 0, root=tmp_path))


def test_lcc_from_a_data_dir(tmp_path, tok):
    (tmp_path / "lcc.jsonl").write_text(json.dumps(LCC_ROW) + "\n")
    task = get_task("code")
    task.data_dir = tmp_path
    assert "lcc" not in task.unavailable() and "has no repobench-p.jsonl" in task.unavailable()["repobench-p"]
    [s] = task.samples(["lcc"], 2, tok, 2048, 0)
    assert s.context + s.questions[0].text == lb.prompts()["lcc"].format(context=LCC_ROW["context"])
    assert (s.metric, s.chat_template, s.max_new_tokens) == ("edit_sim", False, 64)
    assert score(s.metric, "\n    return os.path.join(x)\n", s.questions[0].references) == 100.0
    with pytest.raises(ValueError, match="unknown code subtask"):
        task.samples(["nope"], 1, tok, 2048, 0)


def test_cli_runs_code_stdlib(tmp_path, capsys, tok, monkeypatch):
    lengths = dict(lb.max_new_tokens(), lcc=8)  # 64 new tokens cost seconds on a loaded CPU; 8 suffice here
    monkeypatch.setattr(lb, "max_new_tokens", lambda: lengths)
    monkeypatch.setattr(code_task, "max_new_tokens", lambda: lengths)
    model = save_tiny(tmp_path / "tiny", "llama", max_position_embeddings=2048)
    out = tmp_path / "results"
    code = main(["run", "--model", str(model), "--method", "snapkv", "--ratio", "0.5", "--task", "code:stdlib",
                 "--length", "400", "--samples", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    frame = read_results(out)
    assert len(frame) == 2 and (frame["metric"] == "edit_sim").all()
    for _, row in frame.iterrows():
        assert row["score"] == pytest.approx(edit_sim(row["prediction"], json.loads(row["reference"])))


# ----------------------------------------------------------------------------- math


def test_kvzip_split_and_final_answer():
    problem = "Tom has 3 apples. He buys 2 more at 1.5 dollars each. How many apples does he have?"
    assert math_task.split_problem(problem) == ("Tom has 3 apples. He buys 2 more at 1.5 dollars each.",
                                                "How many apples does he have?")
    assert math_task.split_problem("One sentence only?") == (".", "One sentence only?")
    assert math_task.final_answer("so 2+3=<<2+3=5>>5\n#### 1,234") == "1234"
    with pytest.raises(ValueError):
        math_task.final_answer("no marker")


@pytest.mark.parametrize(("prediction", "extracted", "expected"), [
    ("She sells 9 eggs for $2 each, 9 * 2 = 18. The answer is $18.", "$18.", 100.0),  # "$", final "." dropped
    ("the answer is: 18", "18", 100.0),
    ("First 18, then 20. The answer is 20", "20", 0.0),  # the last number counts
    ("The answer is 1,234.", "1,234.", 0.0),  # against 18; commas are dropped before comparing
    ("The answer is 18.00 dollars.", "18.00", 0.0),  # compared as text, as lm-eval does
    ("The answer is eighteen.", "[invalid]", 0.0),
    ("", "[invalid]", 0.0),
])
def test_gsm8k_flexible_extract(prediction, extracted, expected):
    assert gsm8k_extract(prediction) == extracted
    assert gsm8k_flexible_extract(prediction, ["18"]) == expected


def test_gsm8k_flexible_extract_details():
    assert gsm8k_flexible_extract("The answer is 70,000.", ["70000"]) == 100.0
    assert gsm8k_flexible_extract("x = 5", ["4", "5"]) == 100.0  # best reference
    assert gsm8k_flexible_extract("so 7", ["3+4=<<3+4=7>>7\n#### 7"]) == 100.0  # a whole solution as reference
    assert cut_at_stop("The answer is 18.\nQ: And 2+3? The answer is 5.", math_task.GSM8K_STOP) == "The answer is 18."


def test_math_verify():
    assert math_verify_match(r"so \boxed{\dfrac{1}{2}}", [r"\frac{1}{2}"]) == 100.0
    assert math_verify_match(r"\boxed{0.5}", [r"\frac{1}{2}"]) == 100.0  # equal values
    assert math_verify_match(r"\boxed{\frac43}", [r"\frac{4}{3}"]) == 100.0  # shorthand LaTeX
    assert math_verify_match(r"\boxed{\$36}", ["36"]) == 100.0
    assert math_verify_match(r"\boxed{3, 1}", ["1, 3"]) == 100.0  # an answer list, as a set
    assert math_verify_match(r"\boxed{1,000}", ["1000"]) == 100.0
    assert math_verify_match(r"\boxed{2\sqrt{3}}", [r"\sqrt{12}"]) == 100.0  # symbolic equivalence
    assert math_verify_match(r"\boxed{205}", ["204"]) == 0.0
    assert math_verify_match("", ["204"]) == 0.0


def test_runner_cuts_the_answer_at_a_stop_string(tmp_path):
    from kvbench.core.task import Question, Sample
    from kvbench.models import load_model
    from kvbench.run.config import RunConfig, plan
    from kvbench.run.runner import Runner

    config = RunConfig(methods=["window"], ratios=[0.5], model=str(save_tiny(tmp_path / "tiny", "llama")),
                       dtype="float32", out=tmp_path / "results")
    runner = Runner(config, load_model(config.model, "cpu", "float32", log=lambda *_: None), plan(config))

    def full_answer(stop: list[str]) -> dict:
        sample = Sample("s", "t", "Some context words here. " * 4, [Question("q", " Answer:", ["zzz"])],
                        metric="string_match_all", max_new_tokens=12, chat_template=False, stop=stop)
        return next(r for r in runner.run_sample(sample, "test") if r["method"] == "full")

    first = full_answer([])
    whole = first["prediction"]
    assert len(whole) >= 6
    row = full_answer([whole[3:6]])
    # the text is cut, and decoding stopped at the token that completed the stop string
    assert row["prediction"] == whole[:whole.index(whole[3:6])] and row["new_tokens"] <= first["new_tokens"]

    assert row["score"] == score("string_match_all", row["prediction"], ["zzz"])


def test_gsm8k_samples_follow_kvzip(tok):
    task = get_task("math")
    samples = list(task.samples(["gsm8k"], 4, tok, 1024, 0))
    rows = lb.read_jsonl(math_task.GSM8K_PACKAGED, required=("question", "answer"))
    assert len(rows) == 1319
    for s in samples:
        row = rows[s.meta["index"]]
        context, question = math_task.split_problem(row["question"])
        q = s.questions[0]
        assert s.context == math_task.GSM8K_INSTRUCTION + context
        assert q.text.endswith("beginning with 'The answer is'. Q: " + question)
        assert q.references == [row["answer"].split("####")[-1].strip().replace(",", "")]
        assert count(tok, context) >= 72
        assert (s.metric, s.max_new_tokens, s.chat_template) == ("gsm8k_flexible_extract", 512, True)
        assert s.stop == ["\nQ:"]
    indices = [s.meta["index"] for s in samples]
    skipped = [i for i in range(indices[-1]) if i not in indices]
    assert all(count(tok, math_task.split_problem(rows[i]["question"])[0]) < 72 for i in skipped)


def test_gsm8k_data_dir_and_bad_inputs(tmp_path, tok):
    task = get_task("math")
    task.data_dir = tmp_path
    assert "neither gsm8k.jsonl nor gsm8k/test.jsonl" in task.unavailable()["gsm8k"]
    with pytest.raises(ValueError, match="math:gsm8k is unavailable: --data-dir"):
        task.samples(["gsm8k"], 1, tok, 1024, 0)
    long_problem = "Some words here. " * 30 + "How many?"
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": long_problem, "answer": "x\n#### 7"}) + "\n")
    [s] = task.samples(["gsm8k"], 3, tok, 1024, 0)
    assert s.questions[0].references == ["7"] and s.meta["source"].endswith("test.jsonl")
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"question": long_problem, "answer": "no marker"}) + "\n[\n")
    with pytest.raises(lb.DataError, match=r"gsm8k\.jsonl, line 2: not valid JSON"):
        list(task.samples(["gsm8k"], 1, tok, 1024, 0))
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"question": long_problem, "answer": "no marker"}) + "\n")
    with pytest.raises(lb.DataError, match=r"gsm8k\.jsonl, row 1: no '####'"):
        list(task.samples(["gsm8k"], 1, tok, 1024, 0))
    with pytest.raises(ValueError, match="unknown math subtask"):
        task.samples(["gsm9k"], 1, tok, 1024, 0)


def test_long_reasoning_sets(tok, tmp_path, monkeypatch):
    task = get_task("math")
    assert set(task.subtasks()) == {"gsm8k", "math500", "aime24"}
    monkeypatch.setattr(math_task, "hub_problem", lambda: "the hub cannot be reached (test)")
    unavailable = task.unavailable()
    assert "gsm8k" not in unavailable
    for s, repo in (("math500", "HuggingFaceH4/MATH-500"), ("aime24", "HuggingFaceH4/aime_2024")):
        assert repo in unavailable[s] and f"--data-dir with {s}.jsonl" in unavailable[s]
        with pytest.raises(ValueError, match=f"math:{s} is unavailable"):
            task.samples([s], 1, tok, 1024, 0)
    # offline route: a data dir with the rows (made up here, in the hub sets' fields)
    rows = [{"problem": "What is $1+1$?", "answer": "2"}, {"problem": "Half of 1?", "answer": "\\frac{1}{2}"}]
    (tmp_path / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task.data_dir = tmp_path
    assert "math500" not in task.unavailable() and "has no aime24.jsonl" in task.unavailable()["aime24"]
    samples = list(task.samples(["math500"], 5, tok, 1024, 0))
    assert [s.context for s in samples] == [r["problem"] for r in rows]
    s = samples[1]
    assert s.questions[0].text == "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert (s.metric, s.max_new_tokens, s.chat_template, s.meta["eviction"]) == ("math_verify", 32768, True,
                                                                                 "decoding")
    assert score(s.metric, "so it is \\boxed{\\dfrac{1}{2}}", s.questions[0].references) == 100.0
    assert (math_task.DATA / "gsm8k" / "LICENSE").read_text().startswith("MIT License")


def test_list_tasks_names_every_subtask(capsys, tmp_path):
    assert main(["list", "tasks", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ["longbench:multi_news", "longbench:repobench-p", "code:stdlib", "code:lcc", "math:gsm8k",
                 "math:aime24"]:
        assert name in out
    line = next(l for l in out.splitlines() if l.startswith("longbench:multi_news"))
    assert "unavailable" in line and "has no multi_news.jsonl" in line  # the data dir is the only source
    assert "available" in next(l for l in out.splitlines() if l.startswith("code:stdlib"))
