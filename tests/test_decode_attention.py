"""The CPU's decode attention (:mod:`kvbench.kernels.grouped`) against attention computed other ways:
the kernels' per-head reference loop, SDPA in float64, and a tiny model decoding through SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from kvbench.core import attention, batch, engine
from kvbench.core.budget import Budget
from kvbench.core.session import Session
from kvbench.kernels import reference
from kvbench.kernels.grouped import decode_attention_grouped
from kvbench.plugins import get_method


def inputs(batch_rows: int, heads: int, group: int, length: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch_rows, heads * group, 16, generator=generator).to(dtype)
    keys = torch.randn(batch_rows, heads, length, 16, generator=generator).to(dtype)
    values = torch.randn(batch_rows, heads, length, 16, generator=generator).to(dtype)
    valid = torch.rand(batch_rows, heads, length, generator=generator) > 0.4
    return q, keys, values, valid


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_decode_attention_equals_the_per_head_reference(group, dtype):
    q, keys, values, valid = inputs(3, 2, group, 37, dtype)
    valid[1, 0] = False  # a head that kept nothing attends to nothing
    out = decode_attention_grouped(q, keys, values, valid, 0.25)
    expected = reference.decode_attention_padded(q, keys, values, valid, 0.25)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)
    assert not out[1, :group].any()


def test_grouped_decode_attention_without_a_mask_equals_sdpa_in_float64():
    q, keys, values, _ = inputs(2, 2, 3, 20)
    out = decode_attention_grouped(q, keys, values, None, 0.3)
    expected = F.scaled_dot_product_attention(q.double().unsqueeze(2), keys.double(), values.double(), scale=0.3,
                                              enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)


def test_a_cpu_decoding_step_runs_the_grouped_attention_and_matches_sdpa():
    """``decode_kernels="auto"`` on the CPU routes a stacked (padded) batch's decoded token through the
    grouped attention; its logits equal those of the same step through SDPA."""
    model = tiny_model("llama")
    attention.install(model)
    session = Session(model, prefill_chunk=8, eos_ids={2})
    ids = torch.randint(3, 200, (1, 100), generator=torch.Generator().manual_seed(1))
    prefill = session.prefill(ids, [get_method("snapkv")])
    full = session.full(prefill, get_method("full"))
    snapkv = get_method("snapkv", allocation="global")  # heads keep unequal counts: padding to hide
    cut = session.cut(prefill, session.score(prefill, snapkv, Budget(0.5, "global")), Budget(0.5, "global"))
    logits = {}
    for backend in ("auto", "sdpa"):
        stacked = batch.stack([full.cache, cut.cache], room=4)
        assert stacked.layers[0].padded
        stacked.decode_kernels = backend
        calls = []
        real = attention.decode_attention_grouped
        attention.decode_attention_grouped = lambda *a: calls.append(1) or real(*a)
        try:
            logits[backend] = engine.forward(model, stacked, torch.tensor([[7], [7]]), 100)
        finally:
            attention.decode_attention_grouped = real
        assert bool(calls) == (backend == "auto")
    torch.testing.assert_close(logits["auto"], logits["sdpa"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits["auto"][0], logits["auto"][1])  # the cut row reads fewer entries


def test_the_batch_memory_cap_is_a_share_of_the_memory_available_now():
    cpu = torch.device("cpu")
    available = batch.available_bytes(cpu)
    assert 0 < available
    assert batch.memory_cap(cpu) == pytest.approx(batch.BATCH_MEMORY_SHARE * batch.available_bytes(cpu), rel=0.05)
