"""Every metric against its benchmark's official scorer, on fixtures made by running the official code.

``tests/fixtures/parity/<metric>.jsonl`` holds (prediction, references, kwargs, official value) cases
written by ``make_fixtures.py`` from THUDM/LongBench's eval.py, NVIDIA/RULER's scorer,
lm-evaluation-harness's gsm8k filters and math-verify (README.md there says how). ``-k parity``
selects these tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbench.core.task import cut_at_stop
from kvbench.tasks import longbench as lb
from kvbench.tasks.metrics import METRICS, score

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
TOLERANCE = 1e-9


def _cases(name: str) -> list[dict]:
    with open(FIXTURES / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _params(names):
    return [pytest.param(name, case, id=f"{name}-{i}") for name in names for i, case in enumerate(_cases(name))]


def test_parity_every_metric_has_a_fixture():
    assert sorted(p.stem for p in FIXTURES.glob("*.jsonl")
                  if p.stem in METRICS) == sorted(METRICS), "a metric without a parity fixture"


@pytest.mark.parametrize(("metric", "case"), _params(sorted(METRICS)))
def test_parity_with_the_official_scorer(metric, case):
    got = score(metric, case["prediction"], case["references"], **case["kwargs"])
    assert abs(got - case["official"]) <= TOLERANCE, (metric, case["prediction"], got, case["official"])


@pytest.mark.parametrize("case", _cases("cut_at_stop"), ids=lambda c: repr(c["text"])[:30])
def test_parity_stop_strings_cut_as_lm_eval(case):
    assert cut_at_stop(case["text"], case["stop"]) == case["official"]


def test_parity_multi_news_first_sentence_rouge_l():
    """The shipped multi_news references, each scored against its own first sentence: kvbench's mean
    ROUGE-L equals the official scorer's (and so does every row)."""
    rows = lb.read_jsonl(lb.PACKAGED["multi_news"])
    cases = _cases("multi_news_first_sentence")
    assert len(cases) == len(rows) == 200
    ours = []
    for case in cases:
        references = rows[case["index"]]["answers"]
        assert case["prediction"] and references[0].startswith(case["prediction"])
        ours.append(score(lb.METRIC["multi_news"], case["prediction"], references))
        assert abs(ours[-1] - case["official"]) <= TOLERANCE
    official_mean = sum(c["official"] for c in cases) / len(cases)
    assert abs(sum(ours) / len(ours) - official_mean) <= 1e-6
