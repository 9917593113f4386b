"""The pipeline object: stop strings end decoding at the right token, answers leave the cache as
they found it, and a method's memory is its own in a shared prefill."""

from __future__ import annotations

import torch

from kvbench.core import attention
from kvbench.core.budget import Budget
from kvbench.core.session import Session
from kvbench.plugins import get_method
from tiny_models import tiny_model, tiny_tokenizer


def _session():
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    attention.install(model)
    return Session(model, prefill_chunk=16, eos_ids=set())


def test_a_stop_string_ends_decoding_at_the_token_that_completes_it():
    session, tokenizer = _session(), tiny_tokenizer()
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    full = session.full(session.prefill(ids), get_method("full"))
    tokens = session.answer(full, [5, 6, 7], 40).tokens
    assert len(tokens) == 40
    decode = tokenizer.decode
    text = decode(tokens)
    stop = text[len(text) // 2: len(text) // 2 + 3]  # three characters from the middle
    needed = next(n for n in range(1, 41) if stop in decode(tokens[:n]))  # by brute force
    stopped = session.answer(full, [5, 6, 7], 40, stop=[stop], decode=decode)
    assert stopped.tokens == tokens[:needed]
    assert session.answer(full, [5, 6, 7], 40, stop=["never there \u2603"], decode=decode).tokens == tokens


def test_answers_leave_the_compressed_cache_as_found():
    session = _session()
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    method = get_method("window")
    compressed = session.compress(ids, method, Budget(0.5))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in compressed.cache.layers]
    first = session.answer(compressed, [9, 10], 12).tokens
    again = session.answer(compressed, [9, 10], 12).tokens
    assert first == again
    for (keys, values), layer in zip(before, compressed.cache.layers):
        assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)


def test_a_shared_prefill_charges_each_method_its_own_state():
    """h2o keeps one float32 number per entry (kvpress's normalised variant two); window nothing:
    the full baseline and window are charged none of it, each h2o exactly its own."""
    session = _session()
    ids = torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(3))
    h2o, mean, window = get_method("h2o"), get_method("h2o", normalize=True), get_method("window")
    prefill = session.prefill(ids, [h2o, mean, window])
    kv = prefill.cache.nbytes
    offsets = 3 * 8 * 2 * 2  # the packed layout's start, length, capacity: int64 per KV head and layer
    assert kv == prefill.cache.full_bytes(48) + offsets  # state is held but not counted while shared
    state = 4 * 48 * 2 * 2  # the sums: float32, 48 entries, 2 KV heads, 2 layers
    assert prefill.cache.state_bytes(h2o.state_prefix) == state
    assert prefill.cache.state_bytes(mean.state_prefix) == 2 * state  # sums and counts
    assert session.score(prefill, window).peak_bytes == kv
    assert session.score(prefill, h2o).peak_bytes == kv + state
    assert session.score(prefill, mean).peak_bytes == kv + 2 * state
    full = session.full(prefill, get_method("full"))
    assert full.kv_bytes_physical == kv and full.peak_bytes == kv
