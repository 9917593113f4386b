"""The errors a user can cause. Each carries one line that says what is wrong and what to do; the CLI
prints it on stderr and exits with code 2, and nothing is written."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input: an argument, a file, a model or weights that cannot be used."""


class ModelError(UsageError):
    """A model cannot be used (unknown, unreadable, unsupported architecture, bad device or dtype)."""


class WeightsError(ModelError):
    """A learned method's weights are missing, unreadable or do not fit the model."""


class DownloadError(UsageError):
    """A pinned asset could not be fetched or failed its hash check."""
