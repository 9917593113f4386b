"""Math: GSM8K in KVzip's split (prefill-time eviction), and long-reasoning sets (decode-time).

**gsm8k** follows KVzip (snu-mllab/KVzip, ``data/load.py``, ``data/wrapper.py``, ``model/template.py``):
a test problem is split at ". "; everything before the last piece (joined back, with a final ".")
is the context, which is compressed; the last piece (the actual question) comes after compression.
Problems whose context has fewer than 72 tokens in the model's tokenizer are skipped, as KVzip does,
so the sample set depends on the tokenizer; rows are taken in file order (the seed does not pick
them). The prompt is KVzip's: an instruction before the context, and the question asked as
"Reason and answer the question. You must say the answer in the last sentence beginning with
'The answer is'. Q: ...", inside the model's chat template. Generation: up to 512 new tokens
(KVzip's length for GSM8K), stopping at the model's end-of-sequence token; the answer is cut before
a follow-up "\\nQ:" (lm-eval's gsm8k chain-of-thought tasks stop at "Q:"; we require it to start a
line, since our own question is introduced by "Q:" and a chat model may quote it). Score:
``gsm8k_flexible_extract``, lm-evaluation-harness's gsm8k "flexible-extract" rule (the last number
in the answer, exact match against the final answer after "####"); KVzip itself checks that the
answer text contains the reference. ``--length`` does not apply (contexts are 70-250 tokens).
Data: the test split (1,319 problems, MIT) ships with kvbench; ``--data-dir`` with ``gsm8k.jsonl``
or ``gsm8k/test.jsonl`` (the official schema: ``question``, ``answer``) replaces it.

**math500** (MATH-500, hub ``HuggingFaceH4/MATH-500``, split ``test``) and **aime24** (AIME 2024,
hub ``HuggingFaceH4/aime_2024``, split ``train``) are long-reasoning sets: the prompt is short and
the model reasons for thousands of tokens, so what matters is eviction *during decoding*, which is
the engine's (``--evict-during-decoding``); without it only the short problem is compressed, so run
them with it (each sample says so in ``meta["eviction"]``). Prompt: the problem is the context, and
"Please reason step by step, and put your final answer within \\boxed{}." (the prompt DeepSeek-R1
and Qwen2.5-Math use) is the question, in the chat template. Generation: up to 32,768 new tokens,
stopping at end-of-sequence (a model with fewer positions needs the engine to stop at its limit).
Score: ``math_verify``, huggingface's ``math-verify`` equivalence check of the answer (its last
``\\boxed{}`` first) against the reference, as lighteval scores MATH. Data: the hub through the
``datasets`` package, or ``--data-dir`` with ``math500.jsonl`` / ``aime24.jsonl`` (fields
``problem``, ``answer``); rows in file order.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from typing import Iterator

from transformers import PreTrainedTokenizerBase

from kvbench.core.task import Question, Sample, Task, register_task
from kvbench.tasks.longbench import DATA, DataError, hub_problem, read_jsonl

SUBTASKS = ["gsm8k", "math500", "aime24"]
GSM8K_PACKAGED = DATA / "gsm8k" / "test.jsonl.gz"
GSM8K_MIN_CONTEXT_TOKENS = 72  # KVzip: "pass short context"
GSM8K_MAX_NEW_TOKENS = 512
GSM8K_STOP = ["\nQ:"]
GSM8K_INSTRUCTION = "Given the context, answer to the following reasoning question.\n\n"  # KVzip, verbatim
GSM8K_QUERY = ("\n\nReason and answer the question. You must say the answer in the last sentence "
               "beginning with 'The answer is'. Q: {question}")
REASONING = {  # subtask: (label, hub repo, split)
    "math500": ("MATH-500", "HuggingFaceH4/MATH-500", "test"),
    "aime24": ("AIME 2024", "HuggingFaceH4/aime_2024", "train"),
}
REASONING_PROMPT = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
REASONING_MAX_NEW_TOKENS = 32768


def gsm8k_file(data_dir: Path | None) -> tuple[Path | None, str | None]:
    """The GSM8K test file to read, or why there is none."""
    if data_dir is None:
        return GSM8K_PACKAGED, None
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return None, f"--data-dir {data_dir} is not a directory"
    for candidate in (data_dir / "gsm8k.jsonl", data_dir / "gsm8k" / "test.jsonl"):
        if candidate.is_file():
            return candidate, None
    return None, (f"--data-dir {data_dir} has neither gsm8k.jsonl nor gsm8k/test.jsonl (the GSM8K test "
                  f"split, hub openai/gsm8k); leave out --data-dir to use the copy shipped with kvbench")


def split_problem(problem: str) -> tuple[str, str]:
    """KVzip's split: (the problem up to its last ". ", with a final "."; the last piece)."""
    pieces = problem.split(". ")
    return ". ".join(pieces[:-1]).strip() + ".", pieces[-1].strip()


def final_answer(solution: str) -> str:
    """GSM8K's final answer: what follows "####" in the solution, thousands separators dropped."""
    if "####" not in solution:
        raise ValueError("no '####' final answer")
    return solution.split("####")[-1].strip().replace(",", "")


def gsm8k_samples(path: Path, n_samples: int, tokenizer: PreTrainedTokenizerBase) -> Iterator[Sample]:
    rows = read_jsonl(path, required=("question", "answer"))
    made = 0
    for number, row in enumerate(rows, 1):
        if made == n_samples:
            return
        context, question = split_problem(str(row["question"]))
        if len(tokenizer(context, add_special_tokens=False, verbose=False)["input_ids"]) < GSM8K_MIN_CONTEXT_TOKENS:
            continue
        try:
            answer = final_answer(str(row["answer"]))
        except ValueError as err:
            raise DataError(f"{path}, row {number}: {err}") from None
        sample_id = f"gsm8k-{number - 1}"
        yield Sample(
            sample_id=sample_id,
            subtask="gsm8k",
            context=GSM8K_INSTRUCTION + context,
            questions=[Question(f"{sample_id}-q0", GSM8K_QUERY.format(question=question), [answer])],
            metric="gsm8k_flexible_extract",
            max_new_tokens=GSM8K_MAX_NEW_TOKENS,
            chat_template=True,
            meta={"index": number - 1, "source": str(path), "solution": str(row["answer"])},
            stop=list(GSM8K_STOP),
        )
        made += 1


def reasoning_source(subtask: str, data_dir: Path | None) -> tuple[Path | None, str | None]:
    """(a local file or None for the hub, why the data cannot be had or None)."""
    label, repo, _ = REASONING[subtask]
    if data_dir is not None:
        path = Path(data_dir) / f"{subtask}.jsonl"
        if path.is_file():
            return path, None
        return None, (f"--data-dir {data_dir} has no {subtask}.jsonl ({label}, fields problem and answer); "
                      f"leave out --data-dir to use the hub ({repo})")
    if importlib.util.find_spec("datasets") is None:
        return None, (f"needs {label} from the hub ({repo}) through the datasets package, which is not "
                      f"installed (pip install datasets); or pass --data-dir with {subtask}.jsonl")
    problem = hub_problem()
    if problem:
        return None, f"needs {label} from the hub ({repo}), but {problem}; or pass --data-dir with {subtask}.jsonl"
    return None, None


def reasoning_rows(subtask: str, path: Path | None) -> list[dict]:
    if path is not None:
        return read_jsonl(path, required=("problem", "answer"))
    from datasets import load_dataset

    from kvbench.downloads import hub_dataset_revision

    _, repo, split = REASONING[subtask]
    rows = load_dataset(repo, split=split, revision=hub_dataset_revision(repo))
    return [{"problem": r["problem"], "answer": str(r["answer"])} for r in rows]


def reasoning_samples(subtask: str, path: Path | None, n_samples: int) -> Iterator[Sample]:
    repo = REASONING[subtask][1]
    for index, row in enumerate(reasoning_rows(subtask, path)[:n_samples]):
        sample_id = f"{subtask}-{index}"
        yield Sample(
            sample_id=sample_id,
            subtask=subtask,
            context=str(row["problem"]),
            questions=[Question(f"{sample_id}-q0", REASONING_PROMPT, [str(row["answer"])])],
            metric="math_verify",
            max_new_tokens=REASONING_MAX_NEW_TOKENS,
            chat_template=True,
            meta={"index": index, "source": str(path) if path else repo, "eviction": "decoding"},
        )


@register_task
class Math(Task):
    """GSM8K with its context compressed (KVzip's split); MATH-500 and AIME 2024 for decode-time eviction."""

    name = "math"

    def subtasks(self) -> list[str]:
        return list(SUBTASKS)

    def unavailable(self) -> dict[str, str]:
        out = {}
        _, problem = gsm8k_file(self.data_dir)
        if problem:
            out["gsm8k"] = problem
        for s in REASONING:
            _, problem = reasoning_source(s, self.data_dir)
            if problem:
                out[s] = problem
        return out

    def samples(self, subtasks: list[str], n_samples: int, tokenizer: PreTrainedTokenizerBase,
                length: int, seed: int) -> Iterator[Sample]:
        unknown = [s for s in subtasks if s not in SUBTASKS]
        if unknown:
            raise ValueError(f"unknown math subtask(s) {unknown}; known: {', '.join(SUBTASKS)}")
        blocked = self.unavailable()
        for s in subtasks:
            if s in blocked:
                raise ValueError(f"math:{s} is unavailable: {blocked[s]}")
        parts = []
        for s in subtasks:
            if s == "gsm8k":
                parts.append(gsm8k_samples(gsm8k_file(self.data_dir)[0], n_samples, tokenizer))
            else:
                parts.append(reasoning_samples(s, reasoning_source(s, self.data_dir)[0], n_samples))
        return itertools.chain.from_iterable(parts)
