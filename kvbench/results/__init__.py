"""Results: the parquet schema (``schema``), reading and writing part files (``io``), the statistics
every report shares (``stats``) and the leaderboard table built from them (``table``). The runner,
resume, ``kvbench check``, ``kvbench report``, the lm-eval importer and the leaderboard all go through
here."""

from kvbench.results.io import (Loaded, ResultsWriter, drop_rows, error_rows, git_sha, load, part_files, read_part,
                                read_results, remove_temporaries, set_aside_unreadable, written_keys)
from kvbench.results.schema import COLUMNS, KEY_COLUMNS, SCHEMA, row_key
from kvbench.results.stats import (bootstrap_ci, macro_score, macro_scores, sample_means, stratified_ci, subtask_scores,
                                   summarize)

__all__ = [
    "COLUMNS", "KEY_COLUMNS", "Loaded", "ResultsWriter", "SCHEMA", "bootstrap_ci", "git_sha", "load", "macro_score",
    "macro_scores", "part_files", "read_part", "read_results", "row_key", "sample_means", "stratified_ci",
    "subtask_scores", "summarize", "written_keys", "drop_rows", "error_rows", "remove_temporaries",
    "set_aside_unreadable",
]
