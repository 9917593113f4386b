"""Key re-rotation: after eviction, move each kept key's RoPE phase to its new cache index.

kvbench normally keeps every key at the rotary phase of its original position and feeds later
tokens at their original positions. KeyRerotation (kvpress's ``KeyRerotationPress``, FINCH and the
StreamingLLM paper's cache) instead re-rotates the kept keys as if they had been prefilled back to
back at positions ``0..kept-1``, while the tokens that follow keep their original positions — as
kvpress's pipeline feeds the question at ``context_length`` onwards. RoPE composes additively, so a
key at position ``p`` moves to ``i`` by one more rotation of ``i - p``.
"""

from __future__ import annotations

import torch

from kvbench.core.attention import rotate_half
from kvbench.errors import ModelError


def rope_frequencies(model, method: str) -> torch.Tensor:
    """The model's one RoPE frequency table, which re-rotation turns keys by. Models that rotate
    layers with different tables (Gemma 3: one per layer type) or only part of each head (Phi-3's
    partial rotary factor) are refused in one line."""
    emb = getattr(model.model, "rotary_emb", None)
    inv_freq = getattr(emb, "inv_freq", None)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    if inv_freq is None or 2 * inv_freq.numel() != head_dim:
        raise ModelError(f"{method} re-rotates keys with one full-width RoPE table; model type "
                         f"{model.config.model_type!r} rotates its layers otherwise (per layer type or partially)")
    return inv_freq


def rerotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``keys (B, H, n, D)`` by ``delta (B, H, n)`` positions (float32 angles, as kvpress)."""
    freqs = delta.float().unsqueeze(-1) * inv_freq.float().to(keys.device)  # (B, H, n, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(keys.dtype), emb.sin().to(keys.dtype)
    return keys * cos + rotate_half(keys) * sin


def rerotate_kept(cache, masks: list[torch.Tensor], seen: int, inv_freq: torch.Tensor) -> None:
    """Re-rotate the keys the cache kept under ``masks`` (over slots that were positions ``0..seen-1``)
    to their new per-head indices. Only a cache evicted for the first time knows its positions."""
    for layer, mask in zip(cache.layers, masks):
        if mask.shape[-1] != seen:
            raise ValueError("key re-rotation applies to the first eviction of a whole context only")
        width = layer.keys.shape[2]
        kept_positions = (~mask).to(torch.int8).argsort(dim=-1, stable=True)[..., :width]  # as layer.keep orders them
        delta = torch.arange(width, device=mask.device) - kept_positions
        layer.keys = rerotate(layer.keys, delta, inv_freq)
