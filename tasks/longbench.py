"""LongBench v1 (Bai et al., 2023), the sixteen English tasks, scored as the official ``eval.py`` does.

Facts follow THUDM/LongBench: prompt templates and generation lengths are the official
``config/dataset2prompt.json`` and ``config/dataset2maxlen.json``, shipped verbatim with their MIT
license in ``data/longbench/``; metrics and scoring rules come from ``metrics.py`` and ``eval.py``
(best reference, first line only for trec/triviaqa/samsum) and prompting from ``pred.py`` (no chat
template for trec/triviaqa/samsum/lcc/repobench-p, long prompts truncated in the middle).

Each official prompt is split at ``{context}``: the instruction and the context form
``Sample.context`` (what is prefilled and compressed), the rest of the template with ``{input}``
filled is ``Question.text``, so ``context + text`` is the official prompt character for character.

Length. The official harness cuts a prompt longer than the model's budget to its first and last
half-budget tokens. We do the same, counting the prompt's tokens plainly (no chat template, no
special tokens), with budget ``--max-context`` when given, else ``--length`` minus the task's
generation length (so prompt + answer fit in ``--length``, as for RULER). The question is never cut:
when it is longer than half the budget, the context's tail shrinks instead (the official cut would
eat into the question). Prompts within the budget are left alone, so contexts vary in length.

Data, in order: ``--data-dir`` (``NAME.jsonl`` or ``data/NAME.jsonl``, the official files; when
given it is the only source), else the copy shipped with kvbench (multi_news only), else the
official ``data.zip`` of the hub data set ``THUDM/LongBench``. Rows are taken in file order (the
first ``--samples`` of them; the seed does not pick rows).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from transformers import PreTrainedTokenizerBase

from kvbench.downloads import hub_download, hub_problem
from kvbench.core.task import Question, Sample, Task, register_task

DATA = Path(__file__).resolve().parent / "data"
HUB_REPO = "THUDM/LongBench"
HUB_FILE = "data.zip"

SUBTASKS = [
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
    "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum",
    "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
]
METRIC = {  # eval.py's dataset2metric, with the first-line rule folded into the metric's name
    **dict.fromkeys(["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique"], "qa_f1"),
    **dict.fromkeys(["gov_report", "qmsum", "multi_news"], "rouge_l"),
    "trec": "classification_first_line",
    "triviaqa": "qa_f1_first_line",
    "samsum": "rouge_l_first_line",
    "passage_count": "count",
    "passage_retrieval_en": "retrieval",
    "lcc": "edit_sim",
    "repobench-p": "edit_sim",
}
NO_CHAT_TEMPLATE = {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}  # pred.py
PACKAGED = {"multi_news": DATA / "longbench" / "multi_news.jsonl.gz"}
REQUIRED = ("input", "context", "answers")
MIN_CONTEXT_TOKENS = 16


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


# ----------------------------------------------------------------------------- official config


@functools.cache
def prompts() -> dict[str, str]:
    """The official prompt templates (``dataset2prompt.json``)."""
    return json.loads((DATA / "longbench" / "dataset2prompt.json").read_text(encoding="utf-8"))


@functools.cache
def max_new_tokens() -> dict[str, int]:
    """The official generation lengths (``dataset2maxlen.json``)."""
    return json.loads((DATA / "longbench" / "dataset2maxlen.json").read_text(encoding="utf-8"))


def split_template(subtask: str) -> tuple[str, str]:
    """The official template before ``{context}`` and after it (``{input}`` still in the latter)."""
    head, tail = prompts()[subtask].split("{context}")
    return head, tail


# ----------------------------------------------------------------------------- reading data


def parse_jsonl(lines: Iterable[str], where: str, required: tuple[str, ...] = REQUIRED) -> list[dict]:
    """JSON objects, one a line (blank lines skipped); errors name ``where`` and the line number."""
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}, line {number}: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}, line {number}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{where}, line {number}: missing field(s) {', '.join(missing)}")
        if "answers" in required and (not isinstance(row["answers"], list) or not row["answers"]
                                      or not all(isinstance(a, str) for a in row["answers"])):
            raise DataError(f"{where}, line {number}: 'answers' must be a non-empty list of strings")
        rows.append(row)
    if not rows:
        raise DataError(f"{where}: no rows")
    return rows


def read_jsonl(path: Path, required: tuple[str, ...] = REQUIRED) -> list[dict]:
    """A ``.jsonl`` (or ``.jsonl.gz``) file, checked line by line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return parse_jsonl(f, str(path), required)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None


def data_dir_file(data_dir: Path, name: str) -> Path | None:
    """``DIR/NAME.jsonl``, or ``DIR/data/NAME.jsonl`` as the official data.zip unpacks."""
    for candidate in (data_dir / f"{name}.jsonl", data_dir / "data" / f"{name}.jsonl"):
        if candidate.is_file():
            return candidate
    return None


def _cached_hub_zip() -> Path | None:
    if importlib.util.find_spec("huggingface_hub") is None:
        return None
    return hub_download(HUB_REPO, HUB_FILE, repo_type="dataset", cached_only=True)


def _hub_rows(name: str) -> list[dict]:
    """``NAME.jsonl`` out of the official data.zip of the hub data set (downloaded once, cached by HF, at
    the pinned commit and checked against its sha256)."""
    archive = hub_download(HUB_REPO, HUB_FILE, repo_type="dataset")
    with zipfile.ZipFile(archive) as z:
        members = [m for m in z.namelist() if m.rsplit("/", 1)[-1] == f"{name}.jsonl"]
        if not members:
            raise DataError(f"{archive} ({HUB_REPO}) has no {name}.jsonl")
        with z.open(members[0]) as f:
            return parse_jsonl((line.decode("utf-8") for line in f), f"{HUB_REPO}:{members[0]}")


@dataclass
class Source:
    """Where one data set's rows come from, or why they cannot be had."""

    name: str
    path: Path | None = None  # a local file (data dir or packaged copy)
    hub: bool = False
    problem: str | None = None

    def rows(self) -> list[dict]:
        if self.problem:
            raise DataError(self.problem)
        return read_jsonl(self.path) if self.path else _hub_rows(self.name)


def longbench_source(name: str, data_dir: Path | None) -> Source:
    """The data-dir file, else the packaged copy, else the hub; the problem names every route."""
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            return Source(name, problem=f"--data-dir {data_dir} is not a directory")
        found = data_dir_file(data_dir, name)
        if found is None:
            other = "the copy shipped with kvbench" if name in PACKAGED else "the hub"
            return Source(name, problem=(
                f"--data-dir {data_dir} has no {name}.jsonl (put the official LongBench file there, from "
                f"data.zip of the hub data set {HUB_REPO}, or leave out --data-dir to use {other})"))
        return Source(name, path=found)
    if name in PACKAGED:
        return Source(name, path=PACKAGED[name])
    if _cached_hub_zip() is not None:
        return Source(name, hub=True)
    problem = hub_problem()
    if problem is None:
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            problem = "the huggingface_hub package is not installed"
    if problem:
        return Source(name, problem=(
            f"needs the hub data set {HUB_REPO}, but {problem}; or pass --data-dir with the official "
            f"{name}.jsonl (from {HUB_REPO}'s data.zip)"))
    return Source(name, hub=True)


# ----------------------------------------------------------------------------- building samples


def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def truncate_middle(tokenizer: PreTrainedTokenizerBase, context: str, question: str,
                    budget: int) -> tuple[str, int, int]:
    """Cut ``context`` in its middle so that ``context + question`` has at most ``budget`` tokens.

    As LongBench's pred.py: keep the first half-budget tokens and the last tokens, decode each part
    (special tokens skipped) and join the texts. The question is kept whole. Returns the context,
    the prompt's token count before and after.
    """
    before = _count(tokenizer, context + question)
    if before <= budget:
        return context, before, before
    ids = tokenizer(context, add_special_tokens=False, verbose=False)["input_ids"]
    keep = budget - _count(tokenizer, question)
    if keep < MIN_CONTEXT_TOKENS:
        raise ValueError(f"a prompt budget of {budget} tokens leaves {max(keep, 0)} for the context "
                         f"(the question alone takes {budget - keep}); raise --length or --max-context")
    while True:
        first = min(budget // 2, keep)
        last = keep - first
        text = tokenizer.decode(ids[:first], skip_special_tokens=True)
        if last > 0:
            text += tokenizer.decode(ids[-last:], skip_special_tokens=True)
        after = _count(tokenizer, text + question)
        if after <= budget or keep <= MIN_CONTEXT_TOKENS:  # re-tokenizing the joins may add a token
            return text, before, after
        keep -= after - budget


def prompt_budget(subtask: str, length: int, max_context: int | None) -> int:
    """Prompt tokens allowed: ``--max-context``, else ``--length`` minus the generation length."""
    if max_context is not None:
        if max_context < 64:
            raise ValueError(f"--max-context {max_context} is too short (at least 64 tokens)")
        return max_context
    budget = length - max_new_tokens()[subtask]
    if budget < 64:
        raise ValueError(f"--length {length} is too short for longbench:{subtask}: it generates up to "
                         f"{max_new_tokens()[subtask]} tokens and needs at least 64 for the prompt")
    return budget


def longbench_sample(subtask: str, row: dict, index: int, tokenizer: PreTrainedTokenizerBase,
                     budget: int, source: str) -> Sample:
    """One official row as a Sample, its context cut in the middle to fit ``budget``."""
    head, tail = split_template(subtask)
    question = tail.replace("{input}", str(row["input"]))
    context, before, after = truncate_middle(tokenizer, head + str(row["context"]), question, budget)
    row_id = str(row.get("_id") or index)
    meta = {"index": index, "_id": row_id, "source": source, "budget": budget,
            "prompt_tokens": after, "original_prompt_tokens": before, "truncated": after < before,
            "official_length": row.get("length")}
    if METRIC[subtask].startswith("classification"):
        classes = row.get("all_classes")
        if not isinstance(classes, list) or not classes:
            raise DataError(f"{source}, row {index + 1}: {subtask} needs a non-empty 'all_classes' list")
        meta["metric_kwargs"] = {"all_classes": classes}
    sample_id = f"{subtask}-{row_id}"
    return Sample(
        sample_id=sample_id,
        subtask=subtask,
        context=context,
        questions=[Question(f"{sample_id}-q0", question, [str(a) for a in row["answers"]])],
        metric=METRIC[subtask],
        max_new_tokens=max_new_tokens()[subtask],
        chat_template=subtask not in NO_CHAT_TEMPLATE,
        meta=meta,
    )


def longbench_samples(task: Task, family: str, subtasks: list[str], known: list[str], n_samples: int,
                      tokenizer: PreTrainedTokenizerBase, length: int) -> Iterator[Sample]:
    """Check the subtasks, then yield the first ``n_samples`` rows of each (shared with ``code``)."""
    unknown = [s for s in subtasks if s not in known]
    if unknown:
        raise ValueError(f"unknown {family} subtask(s) {unknown}; known: {', '.join(known)}")
    sources = {s: longbench_source(s, task.data_dir) for s in subtasks}
    for s, src in sources.items():
        if src.problem:
            raise ValueError(f"{family}:{s} is unavailable: {src.problem}")
    budgets = {s: prompt_budget(s, length, task.max_context) for s in subtasks}
    return _generate(sources, n_samples, tokenizer, budgets)


def _generate(sources: dict[str, Source], n_samples: int, tokenizer, budgets) -> Iterator[Sample]:
    for subtask, source in sources.items():
        rows = source.rows()
        where = str(source.path) if source.path else f"{HUB_REPO}:{subtask}.jsonl"
        for index, row in enumerate(rows[:n_samples]):
            yield longbench_sample(subtask, row, index, tokenizer, budgets[subtask], where)


@register_task
class LongBench(Task):
    """LongBench v1's English tasks with the official prompts, lengths and metrics."""

    name = "longbench"

    def subtasks(self) -> list[str]:
        return list(SUBTASKS)

    def unavailable(self) -> dict[str, str]:
        out = {}
        for s in self.subtasks():
            problem = longbench_source(s, self.data_dir).problem
            if problem:
                out[s] = problem
        return out

    def samples(self, subtasks: list[str], n_samples: int, tokenizer: PreTrainedTokenizerBase,
                length: int, seed: int) -> Iterator[Sample]:
        return longbench_samples(self, self.name, subtasks, SUBTASKS, n_samples, tokenizer, length)
