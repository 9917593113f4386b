"""The packed per-head layout against the padded one and against naive attention: the same slots,
scores and state for methods, attention equal to a per-head softmax over the kept entries only,
memory equal to the kept bytes plus offsets and the declared slack, rollback restoring the layer."""

from __future__ import annotations

import pytest
import torch

from kvbench.core import attention, engine
from kvbench.core.budget import Budget
from kvbench.core.cache import EvictableLayer
from kvbench.core.packed import PackedLayer
from kvbench.core.session import Session
from kvbench.kernels import reference
from kvbench.plugins import get_method
from tiny_models import tiny_model

HEADS, GROUP, DIM, LENGTH = 3, 2, 8, 20


def _filled(layer, generator):
    keys = torch.randn(1, HEADS, LENGTH, DIM, generator=generator)
    values = torch.randn(1, HEADS, LENGTH, DIM, generator=generator)
    layer.update(keys, values)
    return keys, values


def _pair(seed: int = 0, slack: int = 4):
    """The same entries in a padded and a packed layer, evicted non-uniformly, then 2 tokens appended."""
    generator = torch.Generator().manual_seed(seed)
    padded, packed = EvictableLayer(), PackedLayer(decode_slack=slack)
    keys, values = _filled(padded, generator)
    packed.update(keys, values)
    mask = torch.rand(1, HEADS, LENGTH, generator=generator) < torch.tensor([0.9, 0.5, 0.2]).view(1, HEADS, 1)
    mask[..., 0] = True  # a sink: no head is empty
    for layer in (padded, packed):
        layer.state["m.s"] = torch.arange(LENGTH).float().expand(1, HEADS, LENGTH).clone()
        layer.keep(mask)
    return padded, packed, mask, generator


def test_slots_state_and_validity_are_the_padded_layouts():
    padded, packed, mask, generator = _pair()
    assert packed.valid is not None and torch.equal(packed.valid, padded.valid)
    assert torch.equal(packed.keys[packed.valid], padded.keys[padded.valid])
    assert torch.equal(packed.state["m.s"], padded.state["m.s"])
    for n in (1, 3):  # a decode token (into reserved slack), then a chunk that outgrows it
        new_k, new_v = torch.randn(2, 1, HEADS, n, DIM, generator=generator)
        padded.update(new_k, new_v)
        packed.update(new_k, new_v)
        assert packed.length == padded.length and torch.equal(packed.valid, padded.valid)
        assert torch.equal(packed.keys[packed.valid], padded.keys[padded.valid])
        assert torch.equal(packed.values[packed.valid], padded.values[padded.valid])
    assert packed.entries() == padded.entries() == int(mask.sum()) + 4 * HEADS


def test_a_second_eviction_keeps_what_the_padded_layout_keeps():
    padded, packed, _, generator = _pair(1)
    for layer in (padded, packed):
        layer.state = {}
        layer.update(torch.ones(1, HEADS, 2, DIM), torch.ones(1, HEADS, 2, DIM))
    mask = torch.rand(1, HEADS, padded.length, generator=generator) < 0.6
    padded.keep(mask)
    packed.keep(mask)
    assert packed.length == padded.length and packed.entries() == padded.entries()
    valid = padded.valid if padded.valid is not None else torch.ones(padded.keys.shape[:3], dtype=torch.bool)
    assert torch.equal(packed.keys[valid], padded.keys[valid])


def _naive(query, keys_per_head, values_per_head, scale):
    """Softmax attention in float64, each query head over its KV head's kept entries only, the last
    ``q`` of which are the queries' own tokens (causal)."""
    _, q_heads, q_len, _ = query.shape
    out = torch.zeros(1, q_len, q_heads, DIM, dtype=torch.float64)
    for hq in range(q_heads):
        k, v = keys_per_head[hq // GROUP].double(), values_per_head[hq // GROUP].double()
        for i in range(q_len):
            seen = k.shape[0] - q_len + i + 1
            weights = torch.softmax(query[0, hq, i].double() @ k[:seen].T * scale, dim=-1)
            out[0, i, hq] = weights @ v[:seen]
    return out


@pytest.mark.parametrize("q_len", [1, 4])
def test_attention_is_each_heads_softmax_over_its_own_entries(q_len):
    _, packed, _, generator = _pair(2)
    new_k, new_v = torch.randn(2, 1, HEADS, q_len, DIM, generator=generator)
    packed.update(new_k, new_v)
    valid = packed.valid
    keys = [packed.keys[0, h][valid[0, h]] for h in range(HEADS)]
    values = [packed.values[0, h][valid[0, h]] for h in range(HEADS)]
    query = torch.randn(1, HEADS * GROUP, q_len, DIM, generator=generator)
    got = packed.attend(query, 0.3)
    torch.testing.assert_close(got.double(), _naive(query, keys, values, 0.3), rtol=1e-5, atol=1e-6)
    if q_len == 1:  # the kernels' plain-PyTorch reference reads the same buffer and offsets
        ref = reference.decode_attention_packed(query[:, :, 0], packed._keys, packed._values, packed.offsets[0],
                                                packed.offsets[1], GROUP, 0.3)
        torch.testing.assert_close(got[:, 0], ref, rtol=1e-5, atol=1e-6)


def test_bytes_are_the_kept_entries_plus_offsets_and_the_declared_slack():
    padded, packed, _, _ = _pair(3, slack=5)
    entry = 2 * DIM * 4
    offsets = 3 * HEADS * 8
    state = 4 * HEADS * padded.length
    assert packed.nbytes == packed.entries() * entry + offsets + state
    assert padded.nbytes > packed.nbytes  # the padded layout pays for its fullest head
    slots, repacks = packed.length, packed.repacks
    packed.update(torch.zeros(1, HEADS, 1, DIM), torch.zeros(1, HEADS, 1, DIM))
    packed.state["m.s"] = torch.cat([packed.state["m.s"], torch.zeros(1, HEADS, 1)], dim=-1)
    assert packed.repacks == repacks + 1  # no room after an eviction: one repack, with slack
    assert packed.nbytes == (packed.entries() + 5 * HEADS) * entry + offsets + 4 * HEADS * packed.length
    packed.truncate(slots)
    assert packed.nbytes == packed.entries() * entry + offsets + state  # the slack is given back


def test_rollback_and_clone_restore_the_layer():
    _, packed, _, generator = _pair(4)
    before = packed.keys.clone(), packed.length, packed.nbytes
    twin = packed.clone()
    packed.update(*torch.randn(2, 1, HEADS, 3, DIM, generator=generator))
    packed.truncate(before[1])
    assert torch.equal(packed.keys, before[0]) and packed.length == before[1] and packed.nbytes == before[2]
    assert torch.equal(twin.keys, before[0]) and twin.nbytes == before[2]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("name,options", [("h2o", {}), ("snapkv", {"window_size": 8})])
def test_answers_and_bytes_packed_against_padded(arch, name, options):
    """The whole pipeline under global allocation: the same answers from both layouts (attention
    agrees to float rounding), and packed physical bytes equal the kept bytes plus the offsets."""
    model = tiny_model(arch)
    model.generation_config.eos_token_id = None
    attention.install(model)
    ids = torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(5))
    results = {}
    for layout in ("padded", "packed"):
        session = Session(model, prefill_chunk=16, eos_ids=set(), layout=layout)
        method = get_method(name, allocation="global", **options)
        prefill = session.prefill(ids, [method])
        compressed = session.cut(prefill, session.score(prefill, method), Budget(0.6, "global"))
        tokens = session.answer(compressed, [5, 6, 7], 12).tokens
        results[layout] = tokens, compressed
    (padded_tokens, padded), (packed_tokens, packed) = results["padded"], results["packed"]
    assert packed_tokens == padded_tokens
    assert packed.kv_bytes_kept == padded.kv_bytes_kept
    assert padded.kv_bytes_physical > padded.kv_bytes_kept  # heads kept different counts: padding
    offsets = sum(3 * layer.kv_heads * 8 for layer in packed.cache.layers)
    assert packed.kv_bytes_physical == packed.kv_bytes_kept + offsets


def test_a_packed_cache_refuses_an_attention_that_would_not_read_it():
    model = tiny_model("llama")  # eager/SDPA attention: kvbench's not installed
    cache = engine.new_cache(model)
    with pytest.raises(ValueError, match="packed cache needs kvbench's attention"):
        engine.forward(model, cache, torch.tensor([[5, 6]]), 0)
