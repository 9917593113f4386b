"""Defaults shared by the command line, the run configuration and model loading (no imports, so
``kvbench --help`` stays fast)."""

DEFAULT_MODEL = "smollm2-135m"

# Subtasks where the default model's full cache scores well at 1K tokens (measured: 2 samples each
# scored 100 on niah_single_1/2/3 and niah_multikey_1, 75 on niah_multivalue, 0-62 on vt, cwe, fwe,
# niah_multikey_2/3 and niah_multiquery), so that what a method loses shows.
DEFAULT_TASK = "ruler:niah_single_1,niah_single_2,niah_multikey_1"
