"""No tracked file names a path of the machine it was made on (a home folder, a scratch checkout, a
temporary folder in prose or a caption): such paths mean nothing to a reader and leak who made it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Absolute paths that only exist on one machine. The look-behind keeps relative paths (a folder inside
# the repository named like a machine root) out; a home folder needs a user name after it. The roots
# are spelt without their slashes so that this file names no machine path itself.
MACHINE_PATH = re.compile(
    r"(?<![\w.~/-])(?:/(?:root|work)/|/home/[A-Za-z_][\w.-]*/|/Users/[A-Za-z_][\w.-]*/|/mnt/[\w.-]+/"
    r"|/private/var/folders/|[A-Za-z]:\\Users\\)"
)
# A temporary folder with a name after it. Shell examples in fenced code blocks may use one (the
# fixtures' READMEs build throw-away virtual environments there); prose and captions may not.
TMP_PATH = re.compile(r"(?<![\w.~/-])/tmp/[\w.-]+")
BINARY = {".png", ".jpg", ".gif", ".safetensors", ".pt", ".gz", ".parquet", ".whl", ".zip"}


def findings(path: str, text: str) -> list[str]:
    """``path:line: text`` for every machine path in ``text``; /tmp only outside fenced code in Markdown."""
    found = []
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if path.endswith(".md") and line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        hit = MACHINE_PATH.search(line) or (path.endswith(".md") and not fenced and TMP_PATH.search(line))
        if hit:
            found.append(f"{path}:{number}: {line.strip()[:160]}")
    return found


def tracked() -> list[str]:
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in listing.stdout.decode().split("\0") if p and (ROOT / p).is_file()]


def absolute(*parts: str) -> str:
    """An absolute path from its parts (the examples below, without writing one out)."""
    return "/" + "/".join(parts)


@pytest.mark.parametrize("path, text, expected", [
    ("README.md", f"![The leaderboard](docs/x.png) `{absolute('work', 'main', 'results', 'run')}`: 1 part file", 1),
    ("README.md", "caption: /tmp/tmpab12/results", 1),
    ("README.md", "```bash\npython -m venv /tmp/kvpress-venv\n```", 0),  # shell example in a fence
    ("notes.txt", "cache under /home/alice/.cache/kvbench", 1),
    ("kvbench/x.py", 'Path("' + absolute("root", ".cache") + '")', 1),
    ("kvbench/x.py", 'tempfile.mkdtemp(dir="/tmp")', 0),  # /tmp with no name after it, in code
    ("README.md", " and ".join(["results" + absolute("work", ""), "data" + absolute("home", "x", ""),
                                "~" + absolute("work", "")]) + " stay relative", 0),  # relative paths, in parts
    ("README.md", "a list of /tmp and /home is fine", 0),
    ("README.md", r"C:\Users\bob\results", 1),
])
def test_the_detector_finds_machine_paths_and_only_them(path, text, expected):
    assert len(findings(path, text)) == expected


def test_no_tracked_file_names_a_machine_path():
    problems = []
    for path in tracked():
        if path == Path(__file__).relative_to(ROOT).as_posix():  # its examples are machine paths on purpose
            continue
        suffix = Path(path).suffix
        if suffix == ".parquet":  # the command that made each row is stored in it, and shown on the leaderboard
            commands = pq.read_table(ROOT / path, columns=["command"]).column(0).to_pylist()
            problems += findings(path, "\n".join(c for c in set(commands) if c))
            continue
        if suffix in BINARY:
            continue
        try:
            text = (ROOT / path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        problems += findings(path, text)
    assert not problems, "machine paths in tracked files:\n" + "\n".join(problems)
