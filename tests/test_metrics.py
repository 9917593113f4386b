"""RULER's string-match metrics and its prediction post-processing, on hand-worked cases."""

import pytest

from kvbench.tasks.metrics import METRICS, ruler_postprocess, score, string_match_all, string_match_part


def test_registry_names_both_ruler_metrics():
    assert METRICS["string_match_all"] is string_match_all
    assert METRICS["string_match_part"] is string_match_part


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("The special magic number is 1234567.", ["1234567"], 100.0),
        ("the top words: APPLE, Banana", ["apple", "banana"], 100.0),  # case-insensitive both ways
        ("numbers: 111 and 333", ["111", "222", "333", "444"], 50.0),  # 2 of 4
        ("numbers: 111", ["111", "222", "333"], 100.0 / 3),
        ("nothing here", ["111", "222"], 0.0),
        ("12345678", ["1234567"], 100.0),  # substring match, as RULER does
        ("", ["x"], 0.0),
    ],
)
def test_string_match_all(prediction, references, expected):
    assert string_match_all(prediction, references) == pytest.approx(expected)
    assert score("string_match_all", prediction, references) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("Paris", ["paris", "Paris, France"], 100.0),  # any alternative answer counts
        ("It is PARIS, France.", ["Lyon", "paris, france"], 100.0),
        ("in the year 1066", ["1066", "eleven sixty-six"], 100.0),
        ("London", ["paris", "Paris, France"], 0.0),
        ("Par", ["paris"], 0.0),  # the reference must be inside the prediction, not the other way
    ],
)
def test_string_match_part(prediction, references, expected):
    assert string_match_part(prediction, references) == expected
    assert score("string_match_part", prediction, references) == expected


def test_all_and_part_differ_on_partial_answers():
    refs = ["alpha", "beta", "gamma", "delta"]
    assert string_match_all("alpha beta gamma", refs) == 75.0
    assert string_match_part("alpha beta gamma", refs) == 100.0


def test_unknown_metric_and_empty_references_are_errors():
    with pytest.raises(KeyError, match="string_match_all"):
        score("exact", "a", ["a"])
    with pytest.raises(ValueError):
        string_match_all("a", [])


def test_predictions_are_post_processed_as_ruler_does():
    # stripped, then every control character (tab, newline, NUL, ...) is a newline, stripped again
    assert ruler_postprocess("  \t 12\x0034\r\n ") == "12\n34"
    assert string_match_all("12\t34", ["12\n34"]) == 100.0
    assert string_match_all("12 34", ["12\t34"]) == 0.0  # a reference holding a tab never matches
    assert string_match_part("  1234567  ", [" 1234567"]) == 0.0  # the prediction loses its spaces
