"""Every scoring method through the whole engine on the tiny Llama and Qwen3: prefill, score, evict
at ratio 0.5, answer a question by greedy decoding, and check the measured ratio.

Learned methods (gated, kvzap, kvzap_ratio) need weights for the model and kvdirect manages its own cache; their
own test files run them end to end.
"""

from __future__ import annotations

import pytest
import torch

from kvbench.core import attention, engine
from kvbench.plugins import get_method, list_methods
from kvbench.core.budget import Budget
from kvbench.core.session import Session
from test_cli import tiny_dir  # noqa: F401  (module fixture: a saved tiny Llama)
from tiny_models import tiny_model, tiny_tokenizer

CONTEXT, KEPT = 96, 48  # ratio 0.5: 48 of 96 entries per head
OWN_TESTS = {"full", "gated", "kvzap", "kvzap_ratio", "kvdirect"}
OPTIONS = {  # make the methods whose defaults fit long contexts compress 96 tokens
    "snapkv": dict(window_size=16),
    "pyramidkv": dict(window_size=16),
    **{wrapper: dict(base=lambda: get_method("snapkv", window_size=16))
       for wrapper in ("adakv", "chunkkv", "criticalkv", "criticaladakv", "keyrerotation")},
    "lagkv": dict(lag_size=16),
    "simlayerkv": dict(threshold=0.0, n_recent=32),  # every layer lazy: 4 initial + 31 recent kept
    "compactor": dict(chunk_size=32),
    "non_causal_attention": dict(chunk_size=32),
    "finch": dict(window_size=16),
}


def kept_per_head(cache) -> list[int]:
    counts = []
    for layer in cache.layers:
        valid = torch.ones(layer.keys.shape[:3], dtype=torch.bool) if layer.valid is None else layer.valid
        counts += valid[0].sum(-1).tolist()
    return counts


def as_expected(name: str, counts: list[int]) -> bool:
    if name == "simlayerkv":
        return set(counts) == {4 + 31}
    if name == "pyramidkv":  # budgets 80 and 16 (kvpress's formula by hand); 16 cannot hold the 4 sinks
        return counts == [80, 80, 20, 20]  # and the 16-token window, which are all protected
    if name == "chunkkv":  # two of five chunks of 20 (the last has 16): whole chunks, not the budget
        return set(counts) <= {36, 40} and len(set(counts)) == 1
    return sum(counts) == KEPT * len(counts)  # the budget: per head, or shared by heads or layers


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("name", sorted(set(list_methods()) - OWN_TESTS))
def test_method_evicts_and_decodes_through_the_engine(arch, name):
    model = tiny_model(arch)
    attention.install(model)
    torch.manual_seed(4)
    context = torch.randint(3, 300, (1, CONTEXT))
    question = torch.randint(3, 300, (1, 5))
    options = {k: v() if callable(v) else v for k, v in OPTIONS.get(name, {}).items()}
    method = get_method(name, **options)
    method.setup(model)
    if name == "kvzip":
        method.bind_tokenizer(tiny_tokenizer())
    budget = Budget(None if method.threshold_mode else 0.5, method.allocation)

    session = Session(model, prefill_chunk=32)
    prefill = session.prefill(context, [method])
    compressed = session.cut(prefill, session.score(prefill, method, budget), budget, consume=True)
    cache, eviction = compressed.cache, compressed.eviction

    counts = kept_per_head(cache)
    assert as_expected(name, counts), counts
    assert eviction.measured_ratio == pytest.approx(1 - sum(counts) / (CONTEXT * len(counts)))
    first = engine.forward(model, cache, question, CONTEXT)
    tokens = engine.greedy(model, cache, first, CONTEXT + question.shape[1], 4, eos_ids=set())
    assert len(tokens) == 4 and all(0 <= t < model.config.vocab_size for t in tokens)


def test_sweep_scores_ratio_dependent_methods_once_per_ratio(tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    """CriticalKV's stage one is sized by the budget: a sweep sharing one prefill scores it again
    for each ratio (and a ratio-agnostic method once), before that ratio's eviction."""
    from kvbench.cli import main
    from kvbench.results import read_results

    calls = []
    real = engine.score_layers

    def spy(model, cache, method, context_ids=None, stream=None, recorder=None, ratio=None, question=0):
        calls.append((method.name, ratio, cache.entries()))
        return real(model, cache, method, context_ids, stream, recorder, ratio, question)

    monkeypatch.setattr(engine, "score_layers", spy)
    out = tmp_path / "sweep"
    assert main(["sweep", "--methods", "criticalkv,window", "--ratios", "0.25,0.5", "--model", str(tiny_dir),
                 "--task", "ruler:niah_single_1", "--length", "400", "--samples", "1", "--out", str(out)]) == 0
    assert [(name, ratio) for name, ratio, _ in calls] == [("criticalkv", 0.25), ("criticalkv", 0.5), ("window", 0.25)]
    assert len({entries for _, _, entries in calls}) == 1  # every scoring saw the whole prefilled cache
    rows = read_results(out)
    assert set(rows.loc[rows.method == "criticalkv", "measured_ratio"].round(2)) == {0.25, 0.5}


@pytest.mark.parametrize("name", sorted(n for n in set(list_methods()) - OWN_TESTS
                                        if get_method(n).incremental and n not in {"window", "random", "h2o"}))
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_incremental_methods_evict_during_prefill_and_decoding_to_the_budget(name, allocation):
    """Methods that score new entries on arrival hold the budget after every chunk and interval,
    padded layouts included."""
    model = tiny_model("qwen3")
    attention.install(model)
    method = get_method(name, allocation=allocation)
    context, ratio = torch.randint(3, 300, (1, 64)), 0.5
    cache = engine.new_cache(model)
    evictor, feeds = Session(model).evictor(cache, method, Budget(ratio, allocation))
    first = engine.prefill(model, cache, context, 0, 16, evictor)
    sizes = [(64, cache.entries())]

    def on_interval(seen):
        evictor(seen)
        sizes.append((seen, cache.entries()))

    tokens = engine.greedy(model, cache, first, 64, 17, eos_ids=set(), every=8, on_interval=on_interval)
    for feed in feeds:
        feed.remove()
    assert len(tokens) == 17 and [s for s, _ in sizes] == [64, 72, 80]
    for seen, entries in sizes:
        assert entries == (seen - round(ratio * seen)) * 2 * 2  # 2 layers x 2 KV heads


def test_finch_takes_the_question_of_a_query_aware_unit_as_its_window():
    """The session hands the question's length to finch: recorded inputs and scores are those of a
    window of exactly that many tokens, and the scored question is kept."""
    from kvbench.core.prompts import Layout

    model = tiny_model("llama")
    attention.install(model)
    ids = torch.randint(3, 300, (1, 60), generator=torch.Generator().manual_seed(2))
    session = Session(model, prefill_chunk=16)
    results = {}
    for spec, layout in [("question", Layout(question=11)), ("fixed", Layout())]:
        method = get_method("finch", window_size=None if spec == "question" else 11)
        method.setup(model)
        prefill = session.prefill(ids, [method], layout=layout)
        assert prefill.recorder.hidden[0].shape[1] == 11  # only the window's attention inputs are kept
        results[spec] = session.score(prefill, method).scores
    for a, b in zip(results["question"], results["fixed"]):
        torch.testing.assert_close(a, b)
    assert bool((results["question"][0][..., -11:] > results["question"][0][..., :-11].max()).all())


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "adakv", "chunkkv"])
def test_snapkv_and_its_kin_refuse_a_context_their_window_covers(name):
    """kvpress asserts the context is longer than SnapKV's window; so does kvbench, in one line, rather
    than fail inside pooling over nothing (a 30-token context, the default 64-token window)."""
    model = tiny_model("llama")
    attention.install(model)
    session = Session(model, prefill_chunk=16, eos_ids={2})
    method = get_method(name)
    prefill = session.prefill(torch.randint(3, 200, (1, 30), generator=torch.Generator().manual_seed(0)), [method])
    with pytest.raises(ValueError, match=r"observation window \(64 tokens\) covers the whole context \(30\)"):
        session.score(prefill, method, Budget(0.5, method.allocation))
