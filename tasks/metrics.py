"""Per-prediction metrics, on a 0–100 scale, looked up by the name a :class:`Sample` carries.

Each metric takes one prediction and that question's references and returns a float in [0, 100].
Aggregation (the mean over samples, any rounding) is the caller's business: RULER rounds its mean to
two decimals, which we leave to reporting so that per-row scores stay exact.
"""

from __future__ import annotations

from typing import Callable

Metric = Callable[[str, list[str]], float]


def _found(prediction: str, references: list[str]) -> list[bool]:
    if not references:
        raise ValueError("a metric needs at least one reference")
    pred = prediction.lower()
    return [ref.lower() in pred for ref in references]


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's metric for every task but qa: the share of references contained in the prediction.

    Substring match, case-insensitive, ×100 — a NIAH answer with 3 of 4 values scores 75.
    """
    found = _found(prediction, references)
    return 100.0 * sum(found) / len(found)


def string_match_part(prediction: str, references: list[str]) -> float:
    """RULER's qa metric: 100 if any reference (alternative gold answers) is in the prediction."""
    return 100.0 if any(_found(prediction, references)) else 0.0


METRICS: dict[str, Metric] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}


def score(metric: str, prediction: str, references: list[str]) -> float:
    """Score one prediction with the metric called ``metric``."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise KeyError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}") from None
    return fn(prediction, references)
