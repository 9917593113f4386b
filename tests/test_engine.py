"""The engine against references computed another way: HF generate, naive attention, masked full caches."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

from kvbench.core import attention, engine
from kvbench.core.budget import Budget, protect, select
from kvbench.core.cache import cache_argument
from kvbench.plugins import get_method
from tiny_models import prefill_and_score as record_and_score
from tiny_models import ARCHITECTURES, tiny_model

ARCHS = list(ARCHITECTURES)
EVICTING = ["window", "random", "snapkv"]


def prefill_and_score(model, ids, method, chunk=7):
    """Prefill ``ids`` into a fresh evictable cache and score it with ``method``."""
    cache, scores, _ = record_and_score(model, ids, method, chunk)
    return cache, scores


def kept_positions(cache):
    """Per layer, per KV head: the context positions still held (read from a tracking state)."""
    out = []
    for layer in cache.layers:
        positions = layer.state["test.position"][0]
        valid = torch.ones_like(positions, dtype=torch.bool) if layer.valid is None else layer.valid[0]
        out.append([positions[h][valid[h]].long().tolist() for h in range(positions.shape[0])])
    return out


def track_positions(cache, seen):
    """Give every entry a state holding its position, so eviction carries it along. A freshly
    prefilled layer holds the last ``length`` of ``seen`` positions (all of them unless it slides)."""
    for layer in cache.layers:
        batch, heads, length, _ = layer.keys.shape
        positions = torch.arange(seen - length, seen).float()
        layer.state["test.position"] = positions.expand(batch, heads, length).clone()


def hf_greedy(model, ids, max_new_tokens):
    """Reference: transformers' own generate with its own cache and SDPA."""
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, past_key_values=DynamicCache(),
                         pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", EVICTING)
def test_ratio_zero_reproduces_full_cache_generation(arch, name):
    reference_model = tiny_model(arch)
    reference_model.generation_config.eos_token_id = None  # decode the full length on both sides
    model = copy.deepcopy(reference_model)
    attention.install(model)
    torch.manual_seed(1)
    context = torch.randint(3, 300, (1, 90))
    question = torch.randint(3, 300, (1, 6))
    expected = hf_greedy(reference_model, torch.cat([context, question], dim=1), 12)

    method = get_method(name, window_size=16) if name == "snapkv" else get_method(name)
    cache, scores = prefill_and_score(model, context, method)
    eviction = engine.evict(cache, scores, method, Budget(0.0, method.allocation), seen=context.shape[1])
    assert eviction.measured_ratio == 0.0
    first = engine.forward(model, cache, question, context.shape[1])
    tokens = engine.greedy(model, cache, first, context.shape[1] + question.shape[1], 12, eos_ids=set())
    assert tokens == expected


def naive_attention(query, key, value, scaling, visible):
    """Per-head loops: query head h reads KV head h // group; ``visible (Hkv, q, L)`` bool."""
    batch, q_heads, q_len, dim = query.shape
    group = q_heads // key.shape[1]
    out = torch.empty(batch, q_len, q_heads, dim)
    for h in range(q_heads):
        kv = h // group
        logits = query[0, h] @ key[0, kv].T * scaling
        logits = logits.masked_fill(~visible[kv], float("-inf"))
        out[0, :, h] = logits.softmax(-1) @ value[0, kv]
    return out


@pytest.mark.parametrize("q_len", [1, 5])
def test_attention_function_matches_naive_end_aligned_causal(q_len):
    torch.manual_seed(0)
    query = torch.randn(1, 6, q_len, 8)
    key, value = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    out, _ = attention.kvbench_attention(None, query, key, value, None, scaling=0.3)
    rows = torch.arange(q_len).unsqueeze(1) + 20 - q_len
    visible = (torch.arange(20).unsqueeze(0) <= rows).expand(2, q_len, 20)
    torch.testing.assert_close(out, naive_attention(query, key, value, 0.3, visible), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_len", [1, 5])
def test_attention_function_with_a_sliding_window_matches_naive_band(q_len):
    """Query i (at cache index 20 - q_len + i) sees itself and the 5 entries before it, no more."""
    torch.manual_seed(0)
    query = torch.randn(1, 6, q_len, 8)
    key, value = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    out, _ = attention.kvbench_attention(None, query, key, value, None, scaling=0.3, sliding_window=6)
    visible = torch.zeros(2, q_len, 20, dtype=torch.bool)
    for i in range(q_len):
        index = 20 - q_len + i
        visible[:, i, index - 5 : index + 1] = True
    torch.testing.assert_close(out, naive_attention(query, key, value, 0.3, visible), rtol=1e-5, atol=1e-5)


# A reference attention over the *full* cache that hides evicted entries with a per-(layer, head) mask.
_REFERENCE_KEEP: dict[int, torch.Tensor] = {}


def _masked_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    q_len, kv_len = query.shape[2], key.shape[2]
    rows = torch.arange(q_len).unsqueeze(1) + kv_len - q_len
    causal = torch.arange(kv_len).unsqueeze(0) <= rows
    window = kwargs.get("sliding_window")
    if window is not None:  # the full cache holds every position: the window is a band of positions
        causal &= torch.arange(kv_len).unsqueeze(0) > rows - window
    visible = causal.expand(key.shape[1], q_len, kv_len).clone()
    keep = _REFERENCE_KEEP.get(module.layer_idx)  # (1, Hkv, context) or None while prefilling the context
    if keep is not None:
        visible[:, :, : keep.shape[-1]] &= keep[0].unsqueeze(1)
    return naive_attention(query, key, value, scaling, visible), None


AttentionInterface.register("kvbench_masked_reference", _masked_reference_attention)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", [*EVICTING, "h2o"])
@pytest.mark.parametrize("allocation", ["uniform", "layer", "global"])
def test_evicted_cache_equals_full_cache_with_evicted_entries_masked(arch, name, allocation):
    model = tiny_model(arch)
    reference = copy.deepcopy(model)
    attention.install(model)
    reference.set_attn_implementation("kvbench_masked_reference")
    # h2o's mean (kvpress's variant) spreads differently over heads: padded layouts appear here, which the
    # paper's sums, dominated by the early tokens every head keeps, do not produce on this context
    options = {"snapkv": {"window_size": 8}, "h2o": {"normalize": True}}.get(name, {})
    method = get_method(name, allocation=allocation, **options)
    ragged_wanted = allocation != "uniform" and name != "window"
    for seed in range(2, 12):  # the first context on which heads keep different counts, where they may
        torch.manual_seed(seed)
        context = torch.randint(3, 300, (1, 64))
        question = torch.randint(3, 300, (1, 5))
        cache, scores = prefill_and_score(model, context, method)
        track_positions(cache, context.shape[1])
        engine.evict(cache, scores, method, Budget(0.6, method.allocation), seen=context.shape[1])
        if not ragged_wanted or any(layer.valid is not None for layer in cache.layers):
            break
    else:
        pytest.fail("no context made the heads keep different counts: the padded layout goes untested")
    kept = kept_positions(cache)
    for layer, heads in zip(cache.layers, kept):  # a sliding layer holds its last window - 1 tokens, uncut
        if layer.compressible:
            continue
        window = layer.window
        assert heads == [list(range(context.shape[1] - window + 1, context.shape[1]))] * len(heads)
    logits = engine.forward(model, cache, question, context.shape[1])

    _REFERENCE_KEEP.clear()
    ref_cache = DynamicCache()
    with torch.no_grad():
        reference(context, **cache_argument(reference, ref_cache), use_cache=True)  # nothing hidden yet
        for layer_idx, heads in enumerate(kept):
            mask = torch.zeros(1, len(heads), context.shape[1], dtype=torch.bool)
            for h, positions in enumerate(heads):
                mask[0, h, positions] = True
            _REFERENCE_KEEP[layer_idx] = mask
        positions = torch.arange(context.shape[1], context.shape[1] + question.shape[1]).unsqueeze(0)
        expected = reference(question, **cache_argument(reference, ref_cache), position_ids=positions).logits[:, -1]
    _REFERENCE_KEEP.clear()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # and eviction did change something, so the comparison can fail
        unevicted = reference(torch.cat([context, question], dim=1)).logits[:, -1]
    assert not torch.allclose(logits, unevicted, atol=1e-3)


def naive_snapkv_kept(attentions, window, kernel, kv_heads, n_keep, sinks=4):
    """SnapKV by hand from the model's own full attention matrices (eager, output_attentions)."""
    kept = []
    for probs in attentions:  # (1, Hq, T, T) per layer
        q_heads, total = probs.shape[1], probs.shape[-1]
        group = q_heads // kv_heads
        prefix = total - window
        layer_kept = []
        for kv in range(kv_heads):
            votes = torch.zeros(prefix)
            for h in range(kv * group, (kv + 1) * group):
                mean_row = probs[0, h, prefix:, :prefix].mean(0)
                pooled = torch.tensor([
                    sum(mean_row[j].item() for j in range(i - kernel // 2, i + kernel // 2 + 1) if 0 <= j < prefix)
                    / kernel for i in range(prefix)
                ])
                votes += pooled / group
            always = set(range(sinks)) | set(range(prefix, total))
            ranked = [i for i in votes.argsort(descending=True).tolist() if i not in always]
            layer_kept.append(sorted(always | set(ranked[: n_keep - len(always)])))
        kept.append(layer_kept)
    return kept


@pytest.mark.parametrize("arch", ARCHS)
def test_snapkv_kept_set_equals_naive_reimplementation(arch):
    model = tiny_model(arch)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    attention.install(model)
    torch.manual_seed(3)
    context = torch.randint(3, 300, (1, 48))
    method = get_method("snapkv", window_size=8, kernel_size=5)
    cache, scores = prefill_and_score(model, context, method, chunk=13)
    track_positions(cache, 48)
    engine.evict(cache, scores, method, Budget(0.5, method.allocation), seen=48)
    kept = kept_positions(cache)
    with torch.no_grad():
        attentions = eager(context, output_attentions=True).attentions
    expected = naive_snapkv_kept(attentions, 8, 5, kv_heads=2, n_keep=24)
    # sliding-window layers (Gemma 3's local ones) are never cut: they hold their last window - 1 tokens
    windows = [getattr(layer, "window", None) for layer in cache.layers]
    expected = [heads if w is None else [list(range(48 - w + 1, 48))] * 2 for heads, w in zip(expected, windows)]
    assert kept == expected
    assert any(w is None for w in windows)


def test_uniform_budget_protects_sinks_and_window_and_hits_the_budget():
    scores = torch.arange(20, 0, -1, dtype=torch.float32).view(1, 1, 20)  # early entries score highest
    scores = torch.cat([scores, scores.flip(-1)], dim=1)  # head 1 prefers late entries
    (mask,) = select([protect(scores, first=4, last=3)], seen=20, budget=Budget(0.5))
    assert mask.sum(-1).tolist() == [[10, 10]]
    assert mask[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 17, 18, 19]
    assert mask[0, 1].nonzero().flatten().tolist() == [0, 1, 2, 3, 14, 15, 16, 17, 18, 19]
    # more protected entries than the budget allows: all protected are kept, the ratio falls short
    (mask,) = select([protect(scores, first=4, last=8)], seen=20, budget=Budget(0.9))
    assert mask.sum(-1).tolist() == [[12, 12]]


def test_rollback_restores_the_compressed_cache():
    model = tiny_model("llama")
    attention.install(model)
    context = torch.randint(3, 300, (1, 40))
    question = torch.randint(3, 300, (1, 4))
    method = get_method("window")
    cache, scores = prefill_and_score(model, context, method)
    engine.evict(cache, scores, method, Budget(0.5, method.allocation), seen=40)
    lengths = cache.lengths()
    answers = []
    for _ in range(2):
        first = engine.forward(model, cache, question, 40)
        answers.append(engine.greedy(model, cache, first, 44, 8, eos_ids=set()))
        cache.rollback(lengths)
        assert cache.lengths() == lengths
    assert answers[0] == answers[1]
