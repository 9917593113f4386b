"""Sliding-window attention layers (Gemma 3's local layers, Mistral's or Phi-3's window), in one place.

A sliding layer's query sees itself and the ``window - 1`` tokens before it (transformers'
``sliding_window_overlay``: key ``j`` is visible from query ``i`` when ``i - window < j <= i``).
kvbench holds such a layer as transformers' ``DynamicSlidingWindowLayer`` does: after every prefill
chunk it keeps only the last ``window - 1`` entries, the most any later query can see. Eviction
methods never compress it — it is already bounded by its window — so budgets and ratios are
defined over the full-attention layers only (``compressible``). While a question is answered the
layer is not trimmed (answers are rolled back by truncation, which cannot bring trimmed entries
back); the band mask hides what the window no longer covers, so attention is the same.

Entries of a sliding layer are never evicted, so cache index and position differ by a constant
and the band can be drawn on cache indices.
"""

from __future__ import annotations

import torch
from torch import nn

from kvbench.core.cache import EvictableLayer


def sliding_window(attn: nn.Module) -> int | None:
    """The layer's window in tokens, or None for full attention. Gemma 3 and Qwen2 set it per layer
    on the attention module; Mistral and Phi-3 pass the config's to every layer."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(getattr(attn, "config", None), "sliding_window", None)


def band_mask(q_len: int, kv_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean ``(q_len, kv_len)``, True where query ``i`` (at cache index ``kv_len - q_len + i``)
    sees entry ``j``: causal, and fewer than ``window`` indices back."""
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    cols = torch.arange(kv_len, device=device).unsqueeze(0)
    return (cols <= rows) & (cols > rows - window)


class SlidingLayer(EvictableLayer):
    """A sliding-window layer: never compressed, trimmed to its last ``window - 1`` entries by
    :meth:`slide` (after each prefill chunk)."""

    compressible = False

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def empty(self) -> "SlidingLayer":
        return SlidingLayer(self.window)

    def slide(self) -> None:
        """Drop the entries no later query can see (all but the last ``window - 1``)."""
        drop = self.length - (self.window - 1)
        if not self.is_initialized or drop <= 0:
            return
        self.keys = self.keys[:, :, drop:].contiguous()
        self.values = self.values[:, :, drop:].contiguous()
        self.state = {name: value[:, :, drop:].contiguous() for name, value in self.state.items()}

    def full_length(self, tokens: int) -> int:
        return min(tokens, self.window - 1)

    def keep(self, mask: torch.Tensor) -> None:
        raise RuntimeError("a sliding-window layer is bounded by its window and never compressed")
