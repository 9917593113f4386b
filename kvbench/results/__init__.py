"""Results: the parquet schema (``schema``), reading and writing part files (``io``), and the
statistics every report shares (``stats``). The runner, resume, ``kvbench check``, the lm-eval
importer and the leaderboard all go through here."""

from kvbench.results.io import (Loaded, ResultsWriter, drop_rows, error_rows, git_sha, load, part_files, read_part,
                                read_results, remove_temporaries, set_aside_unreadable, written_keys)
from kvbench.results.schema import COLUMNS, KEY_COLUMNS, SCHEMA, row_key
from kvbench.results.stats import bootstrap_ci, macro_score, sample_means, stratified_ci, summarize

__all__ = [
    "COLUMNS", "KEY_COLUMNS", "Loaded", "ResultsWriter", "SCHEMA", "bootstrap_ci", "git_sha", "load", "macro_score",
    "part_files", "read_part", "read_results", "row_key", "sample_means", "stratified_ci", "summarize",
    "written_keys", "drop_rows", "error_rows", "remove_temporaries", "set_aside_unreadable",
]
