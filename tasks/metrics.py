"""Per-prediction metrics, on a 0–100 scale, looked up by the name a :class:`Sample` carries.

Each metric takes one prediction and that question's references and returns a float in [0, 100].
Aggregation (the mean over samples, any rounding) is the caller's business: RULER rounds its mean to
two decimals, which we leave to reporting so that per-row scores stay exact.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from decimal import Decimal, InvalidOperation
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


def score(metric: str, prediction: str, references: list[str], **kwargs) -> float:
    """Score one prediction with the metric called ``metric``.

    ``kwargs`` go to the metric: only ``classification`` takes any (``all_classes``, from the sample).
    """
    try:
        fn = METRICS[metric]
    except KeyError:
        raise KeyError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}") from None
    return fn(prediction, references, **kwargs)


# ----------------------------------------------------------------------------- LongBench (English)
#
# Facts from THUDM/LongBench (LongBench/metrics.py, eval.py): each metric gives a value in [0, 1] per
# reference, the sample scores the best reference, and the mean ×100 is reported. The English metrics
# only; the Chinese ones (jieba segmentation) are left out with the Chinese subtasks. ROUGE-L comes from
# Google's ``rouge-score`` and edit similarity from ``rapidfuzz`` rather than the ``rouge`` and
# ``fuzzywuzzy`` packages the official scorer imports; see each function for how the values relate.

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _best(per_reference: Callable[[str], float], references: list[str]) -> float:
    """The official ``max`` over references, on the 0-100 scale."""
    if not references:
        raise ValueError("a metric needs at least one reference")
    return 100.0 * max(per_reference(ref) for ref in references)


def first_line(prediction: str) -> str:
    """LongBench's rule for trec, triviaqa and samsum: the first line after any leading newlines."""
    return prediction.lstrip("\n").split("\n")[0]


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, drop ASCII punctuation, drop a/an/the, squeeze whitespace.

    In that order, as LongBench does: "The U.S.A." → "usa", "an apple-pie" → "applepie".
    """
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction_tokens: list[str], reference_tokens: list[str]) -> float:
    """F1 of the multiset overlap of two token lists, in [0, 1]; 0 when nothing is shared."""
    same = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, references: list[str], **_) -> float:
    """LongBench's ``qa_f1_score``: token F1 of the normalised answer, best reference, ×100."""
    pred = normalize_answer(prediction).split()
    return _best(lambda ref: token_f1(pred, normalize_answer(ref).split()), references)


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, references: list[str], **_) -> float:
    """ROUGE-L F-measure (``rouge-score``'s ``rougeL``: LCS over lower-cased alphanumeric tokens), ×100.

    The official scorer uses the ``rouge`` package (whitespace tokens, case kept, an LCS summed over
    "."-separated sentences). On multi_news reference pairs this gives values 1-2 points lower on
    average than ``rouge``'s, within about -10 and +5 points for one sample.
    """
    scorer = _rouge_scorer()
    return _best(lambda ref: scorer.score(ref, prediction)["rougeL"].fmeasure, references)


def classification(prediction: str, references: list[str], all_classes: list[str] | None = None,
                   **_) -> float:
    """LongBench's ``classification_score`` (trec): 1 / number of class names the answer mentions.

    Class names found in the prediction count, except those that are a strict substring of the
    reference (so "Animal" does not count against the reference "Animal species"); a prediction
    naming only the right class scores 100, one naming it and another 50, one without it 0.
    """
    if not all_classes:
        raise ValueError("the classification metric needs the sample's all_classes")

    def one(reference: str) -> float:
        found = [c for c in all_classes if c in prediction]
        # The official loop removes from the list it iterates over, so the entry after each removal
        # is not examined; we walk the list the same way so that scores are identical.
        i = 0
        while i < len(found):
            if found[i] in reference and found[i] != reference:
                del found[i]
            i += 1
        return 1.0 / len(found) if reference in found else 0.0

    return _best(one, references)


def _share_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count(prediction: str, references: list[str], **_) -> float:
    """LongBench's ``count_score`` (passage_count): share of the numbers in the answer equal to the count."""
    return _best(lambda ref: _share_equal(prediction, str(ref)), references)


def retrieval(prediction: str, references: list[str], **_) -> float:
    """LongBench's ``retrieval_score``: share of the numbers in the answer equal to the "Paragraph N" id."""
    def one(reference: str) -> float:
        found = re.findall(r"Paragraph (\d+)", reference)
        if not found:
            raise ValueError(f"retrieval reference {reference!r} names no 'Paragraph N'")
        return _share_equal(prediction, found[0])

    return _best(one, references)


def code_line(prediction: str) -> str:
    """The line LongBench's ``code_sim_score`` compares: the first without a backtick, '#' or '//'."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def edit_sim(prediction: str, references: list[str], **_) -> float:
    """LongBench's ``code_sim_score``: normalised Indel similarity of the first code line, ×100.

    ``rapidfuzz.fuzz.ratio`` (1 - Indel distance / total length) is what ``fuzzywuzzy.fuzz.ratio``
    computes with python-Levenshtein installed, without fuzzywuzzy's rounding to a whole percent. The
    official requirements leave python-Levenshtein out, so fuzzywuzzy falls back to difflib's
    matcher, which can miss matches: on pairs of stdlib lines our values are 0.7 points higher on
    average for near matches and 4.7 for unrelated lines. An empty line scores 0, as in fuzzywuzzy.
    """
    from rapidfuzz import fuzz

    line = code_line(prediction)
    return _best(lambda ref: fuzz.ratio(line, ref) / 100.0 if line and ref else 0.0, references)


def _on_first_line(metric: Metric) -> Metric:
    def wrapped(prediction: str, references: list[str], **kwargs) -> float:
        return metric(first_line(prediction), references, **kwargs)

    wrapped.__name__ = f"{metric.__name__}_first_line"
    wrapped.__doc__ = f"``{metric.__name__}`` on the prediction's first line (LongBench's few-shot rule)."
    return wrapped


# ----------------------------------------------------------------------------- math

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _as_number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", "").rstrip("."))
    except InvalidOperation:
        return None


def final_number(prediction: str) -> Decimal | None:
    """The answer a GSM8K solution ends on.

    After the last "the answer is" or "####" (case-insensitive) the first number there; without
    either, the last number in the text. Thousands separators and a "$" are ignored.
    """
    marks = list(re.finditer(r"the answer is|####", prediction, flags=re.IGNORECASE))
    if marks:
        numbers = _NUMBER.findall(prediction[marks[-1].end():])
        if numbers:
            return _as_number(numbers[0])
    numbers = _NUMBER.findall(prediction)
    return _as_number(numbers[-1]) if numbers else None


def numeric_match(prediction: str, references: list[str], **_) -> float:
    """100 if the prediction's final number equals a reference numerically ("18.00" = "$18" = "18")."""
    value = final_number(prediction)

    def one(reference: str) -> float:
        target = _as_number(reference.split("####")[-1].strip().lstrip("$"))
        if target is None:
            raise ValueError(f"numeric reference {reference!r} is not a number")
        return float(value is not None and value == target)

    return _best(one, references)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in the text, braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None


def _normalize_math(answer: str) -> str:
    answer = re.sub(r"\\(left|right|!|,|;|:|displaystyle)", "", answer)
    answer = re.sub(r"\\[dt]frac", r"\\frac", answer)
    answer = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", answer)
    answer = answer.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("$", "")
    answer = "".join(answer.split()).rstrip(".")
    number = _as_number(answer)
    return str(number.normalize()) if number is not None and number.is_finite() else answer


def boxed_match(prediction: str, references: list[str], **_) -> float:
    """100 if the last ``\\boxed{}`` answer equals a reference after light LaTeX normalisation.

    A string comparison after dropping spacing commands, ``\\left``/``\\right``, ``\\text{}``, degree and
    percent signs, and comparing numbers by value; it does not prove symbolic equivalence.
    """
    boxed = last_boxed(prediction)
    if boxed is None:
        return 0.0
    mine = _normalize_math(boxed)
    return _best(lambda ref: float(mine == _normalize_math(ref)), references)


METRICS.update({
    "qa_f1": qa_f1,
    "qa_f1_first_line": _on_first_line(qa_f1),
    "rouge_l": rouge_l,
    "rouge_l_first_line": _on_first_line(rouge_l),
    "classification": classification,
    "classification_first_line": _on_first_line(classification),
    "count": count,
    "retrieval": retrieval,
    "edit_sim": edit_sim,
    "numeric_match": numeric_match,
    "boxed_match": boxed_match,
})
