"""Long-code completion: LongBench's ``lcc`` and ``repobench-p``, and an offline task on the stdlib.

``lcc`` and ``repobench-p`` are exactly the LongBench subtasks (same data routes, official prompts,
no chat template, 64 new tokens, middle truncation, ``edit_sim``); see :mod:`kvbench.tasks.longbench`.

``stdlib`` needs no download: it is built from the running interpreter's own standard-library
sources, in the form of ``lcc``. Files of at least 20 KB (outside tests, data tables and
``site-packages``) are put in an order fixed by the seed (sha256 of seed and path); each sample takes
the next file that has a usable cut line, the cut is drawn (by a seeded generator per file) among
the lines that start a statement and have at least the prompt budget's worth of tokens before them,
and the model sees ``lcc``'s prompt over the file up to that line, cut in the middle to the budget:

    Please complete the code given below. \\n<start of the file … the lines just before>Next line of code:\\n

The reference is the next line, indentation kept, trailing spaces dropped. A cut line is the first
line of a statement that starts the line and fits on it (or a compound statement's header ending in
``:``), at least 6 characters, not a bare string, with no ``#``, backtick or ``//`` (lines the
metric would skip in a prediction). The budget is as for LongBench (``--max-context``, else
``--length`` minus 64). Samples depend on the Python version (recorded in ``meta``), the seed, the
tokenizer and the budget.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import itertools
import random
import sys
import sysconfig
import tokenize
from pathlib import Path
from typing import Iterator

from transformers import PreTrainedTokenizerBase

from kvbench.core.task import Question, Sample, Task, register_task
from kvbench.tasks.longbench import (
    longbench_samples, longbench_source, max_new_tokens, prompt_budget, split_template, truncate_middle,
)

LONGBENCH = ["lcc", "repobench-p"]
SUBTASKS = LONGBENCH + ["stdlib"]
MIN_BYTES = 20_000
MIN_LINE_CHARS = 6
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data",
             "encodings", "lib2to3", "ensurepip", "turtledemo"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def stdlib_files(root: Path | None = None) -> tuple[str, ...]:
    """Relative paths of the long ``.py`` files of the standard library, sorted."""
    root = root or stdlib_root()
    if not root.is_dir():
        return ()
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.name.startswith("_sysconfigdata"):
            continue
        try:
            if path.stat().st_size >= MIN_BYTES:
                found.append(rel.as_posix())
        except OSError:
            continue
    return tuple(sorted(found))


def cut_lines(source: str) -> list[int]:
    """0-based indices of the lines a sample may ask for (see the module docstring)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.stmt) or node.lineno > len(lines):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue
        line = lines[node.lineno - 1]
        if node.col_offset != len(line) - len(line.lstrip()):
            continue  # not the first thing on its line
        if hasattr(node, "body"):
            if not line.rstrip().endswith(":"):
                continue  # a header that spans lines
        elif node.end_lineno != node.lineno:
            continue
        text = line.strip()
        if len(text) >= MIN_LINE_CHARS and not any(bad in line for bad in ("#", "`", "//")):
            out.add(node.lineno - 1)
    return sorted(out)


def _read(path: Path) -> str | None:
    try:
        with tokenize.open(path) as f:  # honours coding cookies
            return f.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _token_starts(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int] | None:
    """Character offset where each token starts, or None when the tokenizer cannot say."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except (NotImplementedError, ValueError, TypeError):
        return None
    return [start for start, _ in enc["offset_mapping"]]


def _prefix_tokens(tokenizer: PreTrainedTokenizerBase, text: str, offsets: list[int]) -> list[int]:
    """Tokens before each character offset (exact up to merges across the cut)."""
    starts = _token_starts(tokenizer, text)
    if starts is None:  # proportional estimate from the whole file's count
        total = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        return [round(total * o / max(len(text), 1)) for o in offsets]
    out, j = [], 0
    for o in offsets:  # offsets ascend
        while j < len(starts) and starts[j] < o:
            j += 1
        out.append(j)
    return out


def stdlib_samples(n_samples: int, tokenizer: PreTrainedTokenizerBase, budget: int, seed: int,
                   root: Path | None = None) -> Iterator[Sample]:
    root = root or stdlib_root()
    files = stdlib_files(root)
    order = sorted(files, key=lambda rel: hashlib.sha256(f"code/stdlib/{seed}/{rel}".encode()).hexdigest())
    head, tail = split_template("lcc")
    question = tail.replace("{input}", "")
    head_tokens = len(tokenizer(head, add_special_tokens=False, verbose=False)["input_ids"])
    version = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    made = 0
    for rel in order:
        if made == n_samples:
            return
        source = _read(root / rel)
        if source is None or len(source.encode()) < budget:  # fewer bytes than tokens needed: too short
            continue
        lines = source.splitlines(keepends=True)
        cuts = cut_lines(source)
        if not cuts:
            continue
        pos, line_start = 0, []
        for line in lines:
            line_start.append(pos)
            pos += len(line)
        before = _prefix_tokens(tokenizer, source, [line_start[c] for c in cuts])
        usable = [c for c, n in zip(cuts, before) if head_tokens + n >= budget]
        if not usable:
            continue
        rng = random.Random(f"code/stdlib/{seed}/{rel}")
        cut = rng.choice(usable)
        context, original, prompt_tokens = truncate_middle(tokenizer, head + "".join(lines[:cut]), question, budget)
        sample_id = f"stdlib-{rel}:{cut + 1}"
        yield Sample(
            sample_id=sample_id,
            subtask="stdlib",
            context=context,
            questions=[Question(f"{sample_id}-q0", question, [lines[cut].rstrip()])],
            metric="edit_sim",
            max_new_tokens=max_new_tokens()["lcc"],
            chat_template=False,
            meta={"file": rel, "line": cut + 1, "python": version, "seed": seed, "budget": budget,
                  "prompt_tokens": prompt_tokens, "original_prompt_tokens": original,
                  "truncated": prompt_tokens < original, "index": made},
        )
        made += 1
    if made < n_samples:
        raise ValueError(f"code:stdlib found only {made} standard-library files with more than {budget} "
                         f"tokens before a cut line (asked for {n_samples}); lower --length or --samples")


@register_task
class Code(Task):
    """Next-line code completion in long files: LongBench lcc, repobench-p, and the stdlib (offline)."""

    name = "code"

    def subtasks(self) -> list[str]:
        return list(SUBTASKS)

    def unavailable(self) -> dict[str, str]:
        out = {}
        for s in LONGBENCH:
            problem = longbench_source(s, self.data_dir).problem
            if problem:
                out[s] = problem
        if not stdlib_files():
            out["stdlib"] = (f"this interpreter's standard library at {stdlib_root()} has no .py files of "
                             f"{MIN_BYTES // 1000} KB or more (a stripped or frozen Python)")
        return out

    def samples(self, subtasks: list[str], n_samples: int, tokenizer: PreTrainedTokenizerBase,
                length: int, seed: int) -> Iterator[Sample]:
        unknown = [s for s in subtasks if s not in SUBTASKS]
        if unknown:
            raise ValueError(f"unknown code subtask(s) {unknown}; known: {', '.join(SUBTASKS)}")
        blocked = self.unavailable()
        for s in subtasks:
            if s in blocked:
                raise ValueError(f"code:{s} is unavailable: {blocked[s]}")
        parts = []  # budgets and data sources are checked here, before anything is yielded
        for s in subtasks:
            if s == "stdlib":
                parts.append(stdlib_samples(n_samples, tokenizer, prompt_budget("lcc", length, self.max_context), seed))
            else:
                parts.append(longbench_samples(self, self.name, [s], LONGBENCH, n_samples, tokenizer, length))
        return itertools.chain.from_iterable(parts)
