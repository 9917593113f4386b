"""LongBench: metrics on hand-worked cases, official prompts split at the context, middle truncation,
data routes (data dir, packaged copy, hub zip) and bad inputs, and one end-to-end run on a tiny model.

Fixture rows: the first 3 rows of the official multi_news.jsonl (tests/fixtures/longbench, MIT).
"""

from __future__ import annotations

import gzip
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from kvbench.cli import main
from kvbench.results import read_results
from kvbench.plugins import get_task
from kvbench.tasks import metrics
from kvbench.tasks import longbench as lb
from kvbench.tasks.metrics import (
    classification, code_line, count, edit_sim, first_line, fuzz_ratio, normalize_answer, qa_f1, retrieval, rouge_l,
    score,
)
from tiny_models import save_tiny, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"
ROW = {"input": "What is it?", "context": "Some context.", "answers": ["it"], "length": 3,
       "dataset": "x", "language": "en", "all_classes": None, "_id": "abc"}


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(("text", "expected"), [
    ("The Cat", "cat"),  # case, article
    ("an apple, a pear; the plum!", "apple pear plum"),  # articles only as whole words, punctuation
    ("  lots \t of\n\n space  ", "lots of space"),
    ("U.S.A.", "usa"),  # punctuation goes before articles: "the" inside words stays
    ("theatre anthem", "theatre anthem"),
    ("pre-war don't", "prewar dont"),
    ("“quoted” café", "“quoted” café"),  # only ASCII punctuation is removed (as string.punctuation)
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(("prediction", "references", "expected"), [
    ("Paris", ["paris"], 100.0),
    ("The answer is Paris.", ["Paris"], 2 * (1 / 3) * 1 / (1 / 3 + 1)),  # "answer is paris": P 1/3, R 1
    ("New York City", ["new york"], 2 * (2 / 3) * 1 / (2 / 3 + 1)),
    ("London", ["Paris"], 0.0),
    ("the the", ["the"], 0.0),  # nothing left after normalisation
    ("red red blue", ["red blue blue"], 2 / 3),  # multiset overlap: red×1, blue×1
])
def test_qa_f1_hand_worked(prediction, references, expected):
    factor = 1.0 if expected in (0.0, 100.0) else 100.0
    assert qa_f1(prediction, references) == pytest.approx(expected * factor)


def test_qa_f1_takes_the_best_reference():
    assert qa_f1("Barack Obama", ["Obama", "Barack Obama", "Michelle"]) == pytest.approx(100.0)
    assert qa_f1("Obama", ["Michelle", "Barack Obama"]) == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)


def test_first_line_rules():
    assert first_line("\n\nParis\nand more") == "Paris"
    assert first_line("  Paris\n") == "  Paris"  # only newlines are stripped in front
    assert score("qa_f1_first_line", "\nParis\nLondon London", ["Paris"]) == 100.0
    assert score("qa_f1", "\nParis\nLondon London", ["Paris"]) == pytest.approx(50.0)
    pred = "the cat sat\nQuestion: what?"
    assert score("rouge_l_first_line", pred, ["the cat sat"]) == pytest.approx(100.0)
    assert score("rouge_l", pred, ["the cat sat"]) < 100.0
    classes = ["Animal", "Food", "City"]
    assert score("classification_first_line", "Animal\nFood", ["Animal"], all_classes=classes) == 100.0
    assert score("classification", "Animal\nFood", ["Animal"], all_classes=classes) == 50.0


def _rouge_f(p: float, r: float) -> float:
    return 100 * 2 * p * r / (p + r + 1e-8)  # the rouge package's F, with its 1e-8 smoothing


def test_rouge_l_hand_worked_as_the_rouge_package_counts():
    # distinct words: reference {the, cat, is, on, mat}, prediction {the, cat, sat, on, mat}; the LCS
    # "the cat on the mat" has 4 distinct words: P = R = 4/5
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(_rouge_f(0.8, 0.8))
    # case and punctuation are kept ("." only separates sentences): "sat" is the one shared word of 3
    assert rouge_l("The Cat sat.", ["the cat sat."]) == pytest.approx(_rouge_f(1 / 3, 1 / 3))
    assert rouge_l("The CAT, sat!", ["the cat sat"]) == 0.0
    # sentences split at ".": the LCS is taken per reference sentence against every prediction sentence
    assert rouge_l("c d. a b", ["a b. c d"]) == pytest.approx(_rouge_f(1.0, 1.0))
    assert rouge_l("c d a b", ["a b c d"]) == pytest.approx(_rouge_f(0.5, 0.5))
    assert rouge_l("x y z", ["nothing", "x y", "x y z w"]) == pytest.approx(_rouge_f(1.0, 0.75))  # best reference
    # what the package refuses scores 0: no word in the prediction or the reference
    assert rouge_l("", ["anything"]) == 0.0 and rouge_l("...", ["a b"]) == 0.0 and rouge_l("a b", [""]) == 0.0


def test_classification_hand_worked():
    classes = ["food", "other food", "date", "city"]
    assert classification("It is a date.", ["date"], all_classes=classes) == 100.0
    assert classification("a date or a city", ["date"], all_classes=classes) == 50.0
    assert classification("a city", ["date"], all_classes=classes) == 0.0
    # "food" is a strict substring of the reference "other food": it does not count against it
    assert classification("other food", ["other food"], all_classes=classes) == 100.0
    # the reference itself is never dropped, and the best reference wins
    assert classification("food", ["other food", "food"], all_classes=classes) == 100.0


def test_classification_keeps_the_official_skip_after_a_removal():
    # official loop: "big" is removed, so "cat" (next) is never examined and still counts: 1/2
    classes = ["big", "cat", "big cat"]
    assert classification("big cat", ["big cat"], all_classes=classes) == 50.0
    with pytest.raises(ValueError, match="all_classes"):
        classification("x", ["y"])


def test_count_and_retrieval_hand_worked():
    assert count("There are 3 unique paragraphs.", ["3"]) == 100.0
    assert count("I counted 3, then 3, then 4.", ["3"]) == pytest.approx(100 * 2 / 3)
    assert count("Thirteen", ["13"]) == 0.0  # no digits: 0
    assert count("13", ["3"]) == 0.0  # whole numbers, not substrings
    assert retrieval("Paragraph 12", ["Paragraph 12"]) == 100.0
    assert retrieval("Paragraph 1 or Paragraph 12", ["Paragraph 12"]) == 50.0
    assert retrieval("The answer is: Paragraph 7.", ["Paragraph 12", "Paragraph 7"]) == 100.0
    assert retrieval("none", ["Paragraph 3"]) == 0.0
    with pytest.raises(ValueError, match="Paragraph N"):
        retrieval("1", ["first"])


def test_edit_similarity_hand_worked():
    assert code_line("\n\n# a comment\n```python\nx = 1 // 2\n    return y\nz") == "    return y"
    assert code_line("# only comments") == ""
    assert edit_sim("abcd", ["abce"]) == pytest.approx(75.0)  # difflib: 3 matched of 8 characters
    assert edit_sim("\n# note\nabcd\nmore", ["abcd"]) == 100.0
    assert edit_sim("", ["abc"]) == 0.0 and edit_sim("# x", ["abc"]) == 0.0
    assert edit_sim("# x", [""]) == 100.0 and edit_sim("", [""]) == 100.0  # equal strings, empty ones too
    assert edit_sim("abc", ["xyz", "abd"]) == pytest.approx(67.0)  # 2·2/6 = 66.7%, rounded to a whole percent
    assert fuzz_ratio("abcde", "abcdefghijk") == 62  # 2·5/16 = 62.5%: Python rounds half to even
    assert fuzz_ratio("abcdefg", "abcdefgh") == 93  # 14/15 = 93.3%
    assert fuzz_ratio("ab", "ba") == 50  # difflib matches one block of one character


def test_registry_and_unknown_metric():
    for name in ["qa_f1", "qa_f1_first_line", "rouge_l", "rouge_l_first_line", "classification",
                 "classification_first_line", "count", "retrieval", "edit_sim", "gsm8k_flexible_extract",
                 "math_verify"]:
        assert name in metrics.METRICS
    assert set(lb.METRIC.values()) <= set(metrics.METRICS)
    with pytest.raises(KeyError, match="unknown metric"):
        score("nope", "a", ["a"])
    with pytest.raises(ValueError, match="at least one reference"):
        qa_f1("a", [])


# ----------------------------------------------------------------------------- prompts


def test_official_config_covers_every_english_subtask():
    assert len(lb.SUBTASKS) == 16 and not any(s.endswith("_zh") for s in lb.SUBTASKS)
    assert lb.max_new_tokens()["multi_news"] == 512 and lb.max_new_tokens()["trec"] == 64
    for s in lb.SUBTASKS:
        assert lb.prompts()[s].count("{context}") == 1


@pytest.mark.parametrize("subtask", lb.SUBTASKS)
def test_context_plus_question_is_the_official_prompt(subtask):
    row = dict(ROW, context="CTX {with} braces", input="INPUT {x}", all_classes=["it", "other"])
    sample = lb.longbench_sample(subtask, row, 0, tiny_tokenizer(), 10_000, "test")
    q = sample.questions[0]
    official = lb.prompts()[subtask].replace("{context}", row["context"]).replace("{input}", row["input"])
    assert sample.context + q.text + q.answer_prefix == official
    assert sample.context.endswith(row["context"])  # what is compressed ends with the context
    assert "CTX" not in q.text
    assert sample.chat_template == (subtask not in {"trec", "triviaqa", "samsum", "lcc", "repobench-p"})
    assert sample.max_new_tokens == lb.max_new_tokens()[subtask]
    assert sample.metric == lb.METRIC[subtask]
    assert q.references == ["it"]
    if subtask == "trec":
        assert sample.meta["metric_kwargs"] == {"all_classes": ["it", "other"]}


def test_middle_truncation_keeps_both_ends_and_the_question():
    tok = tiny_tokenizer()
    row = json.loads((FIXTURES / "multi_news.jsonl").read_text().splitlines()[0])
    head, tail = lb.split_template("multi_news")
    full = lb.longbench_sample("multi_news", row, 0, tok, 10**6, "test")
    assert full.context == head + row["context"] and not full.meta["truncated"]
    cut = lb.longbench_sample("multi_news", row, 0, tok, 600, "test")
    q = cut.questions[0].text
    assert q == tail  # the question is never cut
    n = len(tok(cut.context + q, add_special_tokens=False)["input_ids"])
    assert n <= 600 and n >= 595 and cut.meta["prompt_tokens"] == n and cut.meta["truncated"]
    assert cut.context.startswith(head + row["context"][:200])  # the head of the context stays
    assert row["context"].endswith(cut.context[-200:])  # so does its end
    assert len(cut.context) < len(full.context)


def test_budget_from_length_or_max_context():
    assert lb.prompt_budget("multi_news", 2048, None) == 2048 - 512
    assert lb.prompt_budget("multi_news", 2048, 1000) == 1000
    with pytest.raises(ValueError, match="too short for longbench:multi_news"):
        lb.prompt_budget("multi_news", 512, None)
    with pytest.raises(ValueError, match="--max-context 10"):
        lb.prompt_budget("trec", 2048, 10)
    row = dict(ROW, context="word " * 500, input="long question " * 100)
    with pytest.raises(ValueError, match="leaves .* for the context"):
        lb.longbench_sample("passage_retrieval_en", row, 0, tiny_tokenizer(), 200, "test")


# ----------------------------------------------------------------------------- data routes


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_packaged_multi_news_is_the_official_file():
    rows = lb.read_jsonl(lb.PACKAGED["multi_news"])
    fixture = lb.read_jsonl(FIXTURES / "multi_news.jsonl")
    assert len(rows) == 200 and rows[:3] == fixture
    assert (lb.DATA / "longbench" / "LICENSE").read_text().startswith("MIT License")


def test_available_here_without_data_dir():
    task = get_task("longbench")
    unavailable = task.unavailable()
    assert "multi_news" not in unavailable  # shipped
    for reason in unavailable.values():  # whatever else is missing names both routes
        assert "--data-dir" in reason and "THUDM/LongBench" in reason


def test_data_dir_is_the_only_source_when_given(tmp_path):
    shutil.copy(FIXTURES / "multi_news.jsonl", tmp_path / "multi_news.jsonl")
    task = get_task("longbench")
    task.data_dir = tmp_path
    unavailable = task.unavailable()
    assert "multi_news" not in unavailable
    assert "has no qasper.jsonl" in unavailable["qasper"] and str(tmp_path) in unavailable["qasper"]
    samples = list(task.samples(["multi_news"], 5, tiny_tokenizer(), 4096, 0))
    assert len(samples) == 3  # all the file has
    assert samples[0].meta["source"] == str(tmp_path / "multi_news.jsonl")
    with pytest.raises(ValueError, match="longbench:qasper is unavailable: --data-dir .* has no qasper.jsonl"):
        task.samples(["qasper"], 1, tiny_tokenizer(), 4096, 0)
    (tmp_path / "data").mkdir()  # the layout data.zip unpacks to
    write_jsonl(tmp_path / "data" / "trec.jsonl", [dict(ROW, all_classes=["it", "that"])])
    [trec] = task.samples(["trec"], 1, tiny_tokenizer(), 4096, 0)
    assert score(trec.metric, "it\nthat", trec.questions[0].references, **trec.meta["metric_kwargs"]) == 100.0


def test_bad_inputs(tmp_path):
    task = get_task("longbench")
    task.data_dir = tmp_path
    with pytest.raises(ValueError, match="unknown longbench subtask"):
        task.samples(["nope"], 1, tiny_tokenizer(), 2048, 0)
    good = json.dumps(ROW)
    (tmp_path / "qasper.jsonl").write_text(f"{good}\n\n{good}\n{{\"input\": \"x\", \n")
    with pytest.raises(lb.DataError, match=r"qasper\.jsonl, line 4: not valid JSON"):
        list(task.samples(["qasper"], 1, tiny_tokenizer(), 2048, 0))
    write_jsonl(tmp_path / "hotpotqa.jsonl", [ROW, {"input": "q", "answers": ["a"]}])
    with pytest.raises(lb.DataError, match=r"hotpotqa\.jsonl, line 2: missing field\(s\) context"):
        list(task.samples(["hotpotqa"], 1, tiny_tokenizer(), 2048, 0))
    write_jsonl(tmp_path / "musique.jsonl", [dict(ROW, answers="a")])
    with pytest.raises(lb.DataError, match="line 1: 'answers' must be a non-empty list"):
        list(task.samples(["musique"], 1, tiny_tokenizer(), 2048, 0))
    write_jsonl(tmp_path / "trec.jsonl", [ROW])  # all_classes null
    with pytest.raises(lb.DataError, match="trec needs a non-empty 'all_classes'"):
        list(task.samples(["trec"], 1, tiny_tokenizer(), 2048, 0))
    task.data_dir = tmp_path / "missing"
    assert "is not a directory" in task.unavailable()["multi_news"]


def test_hub_route_reads_the_official_zip(tmp_path, monkeypatch):
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("data/samsum.jsonl", json.dumps(ROW) + "\n")
        z.writestr("data/samsum_e.jsonl", "not json\n")
    asked = []

    def cached_hub_file(repo, filename, repo_type="model", cached_only=False):
        asked.append((repo, filename, repo_type))
        return archive

    monkeypatch.setattr(lb, "hub_download", cached_hub_file)
    source = lb.longbench_source("samsum", None)
    assert source.hub and not source.problem
    assert source.rows() == [ROW]
    [sample] = get_task("longbench").samples(["samsum"], 1, tiny_tokenizer(), 2048, 0)
    assert sample.meta["source"] == "THUDM/LongBench:samsum.jsonl" and not sample.chat_template
    assert set(asked) == {("THUDM/LongBench", "data.zip", "dataset")}


def test_gzip_and_empty_files(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps(ROW) + "\n")
    assert lb.read_jsonl(tmp_path / "a.jsonl.gz") == [ROW]
    (tmp_path / "b.jsonl").write_text("\n")
    with pytest.raises(lb.DataError, match="b.jsonl: no rows"):
        lb.read_jsonl(tmp_path / "b.jsonl")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", max_position_embeddings=2048)


def test_cli_runs_multi_news_from_a_data_dir(tiny_dir, tmp_path, capsys, monkeypatch):
    # the official 512 new tokens cost minutes on a loaded CPU; the plumbing is the same with 8
    lengths = dict(lb.max_new_tokens(), multi_news=8)
    monkeypatch.setattr(lb, "max_new_tokens", lambda: lengths)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURES / "multi_news.jsonl", data / "multi_news.jsonl")
    out = tmp_path / "results"
    code = main(["run", "--model", str(tiny_dir), "--method", "snapkv", "--ratio", "0.5", "--task",
                 "longbench:multi_news", "--data-dir", str(data), "--max-context", "300", "--length", "1024",
                 "--samples", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    frame = read_results(out)
    assert len(frame) == 2 and set(frame["method"]) == {"full", "snapkv"}
    assert (frame["metric"] == "rouge_l").all() and frame["score"].between(0, 100).all()
    assert frame["sample_id"].str.startswith("multi_news-").all()
    assert (frame["context_tokens"] <= 300 + 40).all()  # budget plus the chat template's header
    refs = json.loads(frame["reference"].iloc[0])
    pred = frame["prediction"].iloc[0]
    assert frame["score"].iloc[0] == pytest.approx(rouge_l(pred, refs))


@pytest.mark.parametrize(("task", "make", "message"), [
    ("longbench:nope", None, "unknown subtask longbench:nope"),
    ("longbench:multi_news", None, "has no multi_news.jsonl"),
    ("longbench:multi_news", json.dumps(ROW) + '\n{oops\n', "multi_news.jsonl, line 2: not valid JSON"),
])
def test_cli_bad_inputs(tiny_dir, tmp_path, capsys, task, make, message):
    data = tmp_path / "data"
    data.mkdir()
    if make is not None:
        (data / "multi_news.jsonl").write_text(make)
    code = main(["run", "--model", str(tiny_dir), "--method", "snapkv", "--ratio", "0.5", "--task", task,
                 "--data-dir", str(data), "--samples", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
