"""Training text for the learned scorers: general English that no evaluation task shows the model.

The default corpus is text every Python install carries, so training needs no download: the
reference manual's topics (``pydoc_data.topics``, the text ``help()`` prints) and the docstrings of
the standard-library modules that ``code:stdlib`` never samples from (it samples the long modules
only, ``kvbench.tasks.code.stdlib_files``; tests and demo folders are skipped like there), less any
paragraph that shares a run of 13 words with one of the task's files (the manual quotes
docstrings; modules copy them from each other). Both are
under the Python Software Foundation License. The assembled text is hashed, so a provenance file
names exactly what was trained on (it changes with the Python version).

RULER's haystack (the Paul Graham essays), the shipped LongBench and GSM8K data and the stdlib
task's files are evaluation text: ``tests/test_training.py`` checks that the default corpus shares
no 13-word sequence with any of them.

``--corpus PATH`` takes any local text file, a ``.jsonl`` file (one object per line, the text in
``--text-field``) or a folder of ``.txt`` / ``.md`` files.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from kvbench.errors import UsageError

LICENCE = "PSF-2.0 (Python Software Foundation License Version 2)"
MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly signatures and one-liners, not prose
OVERLAP_WORDS = 13  # a paragraph sharing this many words in a row with a task file is dropped


@dataclass(frozen=True)
class Corpus:
    """Documents to train on, where they came from, their licence and a hash of the assembled text."""

    documents: tuple[str, ...]
    source: str
    licence: str

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for doc in self.documents:
            digest.update(doc.encode())
            digest.update(b"\0")
        return digest.hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "licence": self.licence, "sha256": self.sha256,
                "documents": len(self.documents), "characters": sum(len(d) for d in self.documents)}


def pydoc_topics() -> list[str]:
    """The reference manual's topics as ``help()`` shows them, in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


def task_gram_hashes(root: Path | None = None) -> set[int]:
    """Word-run hashes of every file the ``code:stdlib`` task may show."""
    from kvbench.tasks.code import stdlib_files, stdlib_root

    root = root or stdlib_root()
    seen: set[int] = set()
    for rel in stdlib_files(root):
        try:
            seen |= _gram_hashes((root / rel).read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
    return seen


def without_task_text(doc: str, seen_in_task: set[int]) -> str:
    """The document less every paragraph that a run of words shared with a task file touches (the
    manual quotes docstrings, and modules copy them from each other); runs across paragraphs count."""
    paragraphs = re.split(r"\n\s*\n", doc)
    words, owner = [], []
    for index, paragraph in enumerate(paragraphs):
        found = _words(paragraph)
        words += found
        owner += [index] * len(found)
    dropped = set()
    for i in range(len(words) - OVERLAP_WORDS + 1):
        if hash(" ".join(words[i:i + OVERLAP_WORDS])) in seen_in_task:
            dropped.update(owner[i:i + OVERLAP_WORDS])
    return "\n\n".join(p for i, p in enumerate(paragraphs) if i not in dropped).strip()


def stdlib_docstrings(root: Path | None = None) -> list[str]:
    """Docstrings (module, class, function) of the standard-library files ``code:stdlib`` never uses."""
    from kvbench.tasks.code import SKIP_DIRS, stdlib_files, stdlib_root

    root = root or stdlib_root()
    task_files = set(stdlib_files(root))
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.as_posix() in task_files or rel.name.startswith("_sysconfigdata"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    docs.append(doc.strip())
    return docs


def _gram_hashes(text: str) -> set[int]:
    """Hashes of the text's runs of ``OVERLAP_WORDS`` words (lower case, letters and digits only)."""
    words = _words(text)
    return {hash(" ".join(words[i:i + OVERLAP_WORDS])) for i in range(len(words) - OVERLAP_WORDS + 1)}


def python_corpus() -> Corpus:
    """The offline default: pydoc topics, then stdlib docstrings, deduplicated in order."""
    seen_in_task = task_gram_hashes()
    kept = (without_task_text(doc, seen_in_task) for doc in pydoc_topics() + stdlib_docstrings())
    docs = list(dict.fromkeys(doc for doc in kept if len(doc) >= MIN_DOCSTRING_CHARS))
    version = sys.version.split()[0]
    return Corpus(tuple(docs), f"Python {version} reference topics (pydoc_data.topics) and the docstrings of "
                  "standard-library modules outside the code:stdlib task",
                  LICENCE)


def read_corpus(path: str | Path | None, text_field: str = "text") -> Corpus:
    """The default corpus, or a local text / JSONL file or folder; bad input is a ``UsageError``."""
    if path is None:
        return python_corpus()
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise UsageError(f"--corpus {path}: the folder holds no .txt or .md files")
        docs = [_read(p) for p in files]
    elif path.is_file():
        docs = _jsonl(path, text_field) if path.suffix == ".jsonl" else [_read(path)]
    else:
        raise UsageError(f"--corpus {path}: no such file or folder")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UsageError(f"--corpus {path}: no text in it")
    return Corpus(tuple(docs), f"{path.name}" + (f" (field {text_field!r})" if path.suffix == ".jsonl" else ""),
                  "as the corpus's own (local file, not checked)")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--corpus {path}: cannot read it as UTF-8 text ({type(err).__name__})") from None


def _jsonl(path: Path, field: str) -> list[str]:
    docs = []
    for number, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"--corpus {path}: line {number} is not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise UsageError(f"--corpus {path}: line {number} has no text field {field!r} (set --text-field)")
        docs.append(row[field])
    return docs


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())
