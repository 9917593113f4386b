"""The evictable KV cache: a transformers ``Cache`` whose layers can be shrunk and rolled back.

Each layer stores keys and values as ``(batch, kv_heads, entries, head_dim)`` tensors, as
transformers' ``DynamicLayer`` does, so every model attention path that calls ``cache.update``
works unchanged. Eviction gathers the kept entries into new, smaller tensors: the memory is really
freed, not masked. Keys keep the rotary phase of their original position, so after eviction the
cache index of an entry no longer equals its position; the engine passes explicit ``position_ids``
and kvbench's attention function (``kvbench.attention``) builds the causal mask from the cache's
own layout rather than from positions.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class EvictableLayer(DynamicLayer):
    """One layer's keys and values, with in-place eviction and truncation."""

    def keep(self, indices: torch.Tensor) -> None:
        """Keep only ``indices`` (``batch, kv_heads, n``, ascending) along the entry axis."""
        index = indices.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, index).contiguous()
        self.values = self.values.gather(2, index).contiguous()

    def truncate(self, length: int) -> None:
        """Drop every entry after the first ``length`` (rolls back appended question/answer tokens)."""
        self.keys = self.keys[:, :, :length].contiguous() if length < self.keys.shape[2] else self.keys
        self.values = self.values[:, :, :length].contiguous() if length < self.values.shape[2] else self.values

    def clone(self) -> "EvictableLayer":
        copy = EvictableLayer()
        if self.is_initialized:
            copy.lazy_initialization(self.keys, self.values)
            copy.keys, copy.values = self.keys.clone(), self.values.clone()
        return copy

    @property
    def length(self) -> int:
        return self.get_seq_length()

    @property
    def nbytes(self) -> int:
        """Bytes allocated by this layer's tensors."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class EvictableCache(Cache):
    """A cache of :class:`EvictableLayer` s, one per decoder layer, with byte accounting."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[EvictableLayer() for _ in range(num_layers)])
        self.peak_bytes = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:  # once per forward: every layer has grown by now
            self.peak_bytes = max(self.peak_bytes, self.nbytes)
        return keys, values

    @property
    def nbytes(self) -> int:
        """Bytes physically allocated for keys and values in every layer."""
        return sum(layer.nbytes for layer in self.layers)

    def entries(self) -> int:
        """KV entries held, summed over layers and KV heads (batch 1)."""
        return sum(layer.keys.shape[1] * layer.keys.shape[2] for layer in self.layers if layer.is_initialized)

    def lengths(self) -> list[int]:
        return [layer.length for layer in self.layers]

    def rollback(self, lengths: list[int]) -> None:
        """Truncate each layer back to a length recorded with :meth:`lengths`."""
        for layer, length in zip(self.layers, lengths):
            layer.truncate(length)

    def clone(self) -> "EvictableCache":
        copy = EvictableCache(0)
        copy.layers = [layer.clone() for layer in self.layers]
        copy.peak_bytes = self.peak_bytes
        return copy
