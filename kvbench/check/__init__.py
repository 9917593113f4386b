"""``kvbench check``: compare a candidate results folder against a baseline (``compare``) and render
the report (``render``)."""

from kvbench.check.compare import CheckError, CheckOptions, Report, check, compare
from kvbench.check.render import render

__all__ = ["CheckError", "CheckOptions", "Report", "check", "compare", "render"]
