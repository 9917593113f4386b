"""KVzip against a naive reference built from the model's own full attention matrices (eager)."""

from __future__ import annotations

import copy

import pytest
import torch

from kvbench.core.budget import Budget

from kvbench.core import attention, engine
from kvbench.plugins import get_method
from kvbench.core.prompts import split_prompt
from methods_kvzip_helpers import naive_kvzip
from tiny_models import tiny_model, tiny_tokenizer

TEXT = ("The grass is green. The sky is blue. One of the special magic numbers for the key is: 1234567. "
        "Here we go. There and back again. The sun is yellow.")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def prefilled(model, ids):
    cache = engine.new_cache(model)
    engine.prefill(model, cache, ids, 0, 16)
    return cache


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("chunk_size", [1000, 23])  # one chunk (softmax over the whole cache), and several
@pytest.mark.parametrize("plus", [False, True])
def test_kvzip_scores_equal_naive_attention_matrices(arch, chunk_size, plus, tokenizer):
    model = tiny_model(arch)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    attention.install(model)
    context = torch.tensor([split_prompt(tokenizer, TEXT, chat_template=True).context_ids])
    cache = prefilled(model, context)
    before = [layer.keys.clone() for layer in cache.layers]

    method = get_method("kvzip", chunk_size=chunk_size, plus=plus, query_block=7).bind_tokenizer(tokenizer)
    scores = method.score_cache(model, cache, context)

    expected = naive_kvzip(eager, tokenizer, context[0].tolist(), chunk_size, plus=plus)
    assert len(scores) == len(expected) == model.config.num_hidden_layers
    for got, want in zip(scores, expected):
        assert got.shape == (1, 2, context.shape[1])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the repeat's KV was discarded: the cache is exactly as prefilled
    for layer, keys in zip(cache.layers, before):
        assert torch.equal(layer.keys, keys)
    if not plus:  # probabilities, and not all alike (the comparison can fail)
        assert all(0 <= float(s.min()) and float(s.max()) <= 1 for s in scores)
        assert float(scores[0].std()) > 1e-3


def test_kvzip_through_the_engine_protects_sinks_and_cuts_ratios(tokenizer):
    model = tiny_model("llama")
    attention.install(model)
    context = torch.tensor([split_prompt(tokenizer, TEXT, chat_template=True).context_ids])
    cache = prefilled(model, context)
    method = get_method("kvzip").bind_tokenizer(tokenizer)
    assert method.allocation == "global"
    scores = engine.score_layers(model, cache, method, context)
    total = context.shape[1]
    engine.evict(cache, scores, method, Budget(0.5, method.allocation), total)
    assert abs(cache.entries() / (2 * 2 * total) - 0.5) < 0.05
    for layer in cache.layers:  # the sinks are still there, first in every head, with their phase
        valid = layer.valid if layer.valid is not None else torch.ones(layer.keys.shape[:3], dtype=torch.bool)
        assert valid[..., :4].all()
