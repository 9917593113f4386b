"""Per-prediction metrics, on a 0–100 scale, looked up by the name a :class:`Sample` carries.

Each metric takes one prediction and that question's references and returns a float in [0, 100].
A metric named after a benchmark gives, for one row, exactly what that benchmark's official scorer
gives (×100): ``tests/test_metrics_parity.py`` checks every one against values made by running the
official code (``tests/fixtures/parity/README.md`` says how).

Aggregation is left to reporting, so that per-row scores stay exact: LongBench's ``eval.py`` reports
``round(100 * mean, 2)`` per dataset and RULER ``round(mean, 2)`` per task; kvbench stores each
row's unrounded score and the reader takes means.
"""

from __future__ import annotations

import difflib
import functools
import re
import string
from collections import Counter
from typing import Callable

Metric = Callable[[str, list[str]], float]


def _best(per_reference: Callable[[str], float], references: list[str]) -> float:
    """The best reference's value (in [0, 1]) ×100, as LongBench's ``eval.py`` takes it."""
    if not references:
        raise ValueError("a metric needs at least one reference")
    return 100.0 * max(per_reference(ref) for ref in references)


# ----------------------------------------------------------------------------- RULER
#
# NVIDIA/RULER, scripts/eval/synthetic/constants.py (the metrics) and scripts/eval/evaluate.py
# (``postprocess_pred``, applied to every prediction before it is scored).

_CONTROL = re.compile(r"[\x00-\x1f]")


def ruler_postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, turn every C0 control character into a newline, strip.

    Tabs and newlines are C0 characters too, so a reference that holds one never matches.
    """
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _found(prediction: str, references: list[str]) -> list[bool]:
    if not references:
        raise ValueError("a metric needs at least one reference")
    pred = ruler_postprocess(prediction).lower()
    return [ref.lower() in pred for ref in references]


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's metric for every task but qa: the share of references contained in the prediction.

    Substring match, case-insensitive, ×100 — a NIAH answer with 3 of 4 values scores 75.
    """
    found = _found(prediction, references)
    return sum(found) / len(found) * 100


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
# THUDM/LongBench, LongBench/metrics.py and eval.py: each metric gives a value in [0, 1] per
# reference, a row scores its best reference, and trec, triviaqa and samsum (and the Chinese lsht)
# score only the prediction's first line. The English metrics only; the Chinese ones (jieba
# segmentation) are left out with the Chinese subtasks.

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


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
def _rouge():
    from rouge import Rouge

    return Rouge()  # holds only its settings, so one instance serves every call


def _rouge_l_f(prediction: str, reference: str) -> float:
    try:
        return _rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
    except Exception:  # the official scorer's bare except: an empty text, a recursion too deep
        return 0.0


def rouge_l(prediction: str, references: list[str], **_) -> float:
    """LongBench's ``rouge_score``: the ``rouge`` package's (1.0.1) summary-level ROUGE-L F, ×100.

    The official call, ``Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]``:
    texts split into sentences at every ".", words at single spaces, case and punctuation kept, the
    union LCS summed over reference sentences, lengths and overlaps counted in distinct words (the
    package's default). Whatever raises scores 0, as in the official code: a prediction or reference
    with no word (empty, only dots), or a sentence pair long enough (about a thousand words) to
    exhaust Python's recursion limit in the package's LCS reconstruction.
    """
    return _best(lambda ref: _rouge_l_f(prediction, ref), references)


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


def fuzz_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` (0.18.0) as LongBench's requirements install it, an integer 0–100.

    Without python-Levenshtein (not in the official requirements) fuzzywuzzy uses difflib: equal
    strings (two empty ones too) give 100, one empty string 0, otherwise ``SequenceMatcher(None, a,
    b).ratio()`` ×100 rounded as Python's ``round`` does (half to even). These few lines replace the
    dependency because fuzzywuzzy silently switches to a different algorithm whenever
    python-Levenshtein happens to be installed, which would change the scores.
    """
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def edit_sim(prediction: str, references: list[str], **_) -> float:
    """LongBench's ``code_sim_score`` (lcc, repobench-p): ``fuzz_ratio`` of the first code line, ×100.

    A prediction without a code line compares as the empty string: 100 against an empty reference,
    0 otherwise.
    """
    line = code_line(prediction)
    return _best(lambda ref: fuzz_ratio(line, ref) / 100, references)


def _on_first_line(metric: Metric) -> Metric:
    def wrapped(prediction: str, references: list[str], **kwargs) -> float:
        return metric(first_line(prediction), references, **kwargs)

    wrapped.__name__ = f"{metric.__name__}_first_line"
    wrapped.__doc__ = f"``{metric.__name__}`` on the prediction's first line (LongBench's few-shot rule)."
    return wrapped


# ----------------------------------------------------------------------------- math

# lm-evaluation-harness, lm_eval/tasks/gsm8k/gsm8k-cot-zeroshot.yaml: the "flexible-extract" filter
# and the exact_match settings (ignore_case, regexes_to_ignore) shared by every gsm8k task.
_GSM8K_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
_GSM8K_FALLBACK = "[invalid]"


def gsm8k_extract(prediction: str) -> str:
    """lm-eval's gsm8k ``flexible-extract`` filter: the last number-like run in the text.

    Regex ``(-?[$0-9.,]{2,})|(-?[0-9]+)``, the last match (``group_select: -1``), its non-empty
    group, stripped; "[invalid]" when the text has no digit, "$" or "." run.
    """
    matches = _GSM8K_NUMBER.findall(prediction)
    if not matches:
        return _GSM8K_FALLBACK
    groups = [g for g in matches[-1] if g]
    return (groups[0] if groups else _GSM8K_FALLBACK).strip()


def _gsm8k_normalize(text: str) -> str:
    for pattern in _GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def gsm8k_flexible_extract(prediction: str, references: list[str], **_) -> float:
    """lm-eval's gsm8k ``flexible-extract`` score: 100 if the extracted number equals the answer.

    Chosen over ``strict-match`` because a chat model answers in free form: strict-match needs the
    exact phrase "The answer is N." (a "$", bold or a unit breaks it), while flexible-extract takes
    the last number wherever it is. Both sides then go through lm-eval's ``exact_match`` with its
    gsm8k settings: commas, "$", anything up to "#### " and one final "." removed, lower-cased, then
    compared as strings, so "18.00" does not equal "18" (as in lm-eval). The reference is the
    solution's final answer (or the whole solution: "#### " strips what precedes it).
    """
    answer = _gsm8k_normalize(gsm8k_extract(prediction))
    return _best(lambda ref: float(answer == _gsm8k_normalize(ref)), references)


@functools.cache
def _math_verify():
    import math_verify

    return math_verify


def math_verify_match(prediction: str, references: list[str], **_) -> float:
    """100 if ``math-verify`` (huggingface/Math-Verify) finds the prediction's answer equal to a reference.

    Called as Math-Verify's own ``math_metric`` and lighteval's MATH tasks do: the reference, a bare
    LaTeX answer as MATH-500 and AIME give it, is wrapped in ``\\boxed{}`` (where the official
    solutions carry it) and parsed with ``LatexExtractionConfig``; the prediction is parsed with the
    default extraction (LaTeX, then plain expressions: a last ``\\boxed{}`` first); ``verify``
    decides symbolic and numeric equivalence (6 decimals). Its time limits use SIGALRM, so this
    metric runs only in the main thread.
    """
    mv = _math_verify()
    answer = mv.parse(prediction)

    def one(reference: str) -> float:
        gold = mv.parse("\\boxed{" + reference + "}", [mv.LatexExtractionConfig()])
        if not gold:
            raise ValueError(f"math reference {reference!r} does not parse as LaTeX")
        return float(mv.verify(gold, answer))

    return _best(one, references)


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
    "gsm8k_flexible_extract": gsm8k_flexible_extract,
    "math_verify": math_verify_match,
})
