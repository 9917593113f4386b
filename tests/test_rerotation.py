"""Key re-rotation against RoPE computed directly: a key rotated at position p, moved by i - p,
equals the same pre-RoPE key rotated at position i."""

from __future__ import annotations

import pytest
import torch

from kvbench.core.attention import apply_rope, prerope_keys
from kvbench.core.cache import EvictableCache
from kvbench.core.rerotation import rerotate_kept
from tiny_models import tiny_model


def test_rerotated_keys_equal_keys_rotated_at_their_new_positions():
    model = tiny_model("llama")
    attn, rotary = model.model.layers[0].self_attn, model.model.rotary_emb
    hidden = torch.randn(1, 12, model.config.hidden_size)
    with torch.no_grad():
        raw = prerope_keys(attn, hidden)  # (1, 2, 12, 16)
        cos, sin = rotary(hidden, torch.arange(12).unsqueeze(0))
        cache = EvictableCache(1)
        cache.update(apply_rope(raw, cos, sin), torch.zeros_like(raw), 0)
    mask = torch.zeros(1, 2, 12, dtype=torch.bool)
    mask[0, 0, [0, 3, 7, 11]] = True
    mask[0, 1, [1, 2, 5, 9]] = True
    cache.layers[0].keep(mask)
    rerotate_kept(cache, [mask], 12, rotary.inv_freq)
    new_cos, new_sin = rotary(hidden, torch.arange(4).unsqueeze(0))
    for head, kept in enumerate([[0, 3, 7, 11], [1, 2, 5, 9]]):
        expected = apply_rope(raw[:, head : head + 1, kept], new_cos, new_sin)
        torch.testing.assert_close(cache.layers[0].keys[:, head : head + 1], expected, rtol=1e-5, atol=1e-5)


def test_rerotation_refuses_a_cache_evicted_before():
    cache = EvictableCache(1)
    cache.update(torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4), 0)
    with pytest.raises(ValueError, match="first eviction"):
        rerotate_kept(cache, [torch.ones(1, 1, 6, dtype=torch.bool)], 10, torch.ones(2))
