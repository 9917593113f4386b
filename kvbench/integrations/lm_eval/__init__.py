"""kvbench as an lm-evaluation-harness model (``model``) and the importer of its runs (``importer``)."""
