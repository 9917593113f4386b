"""The evictable KV cache: a transformers ``Cache`` whose layers can be shrunk and rolled back.

Each layer stores keys and values as ``(batch, kv_heads, entries, head_dim)`` tensors, as
transformers' ``DynamicLayer`` does, so every model attention path that calls ``cache.update``
works unchanged. Eviction gathers the kept entries into new, smaller tensors: the memory is really
freed, not masked.

When heads keep different numbers of entries (``layer`` and ``global`` allocation), a layer is
stored padded to its fullest head, with a boolean ``valid`` mask marking real entries; the padding
is real memory and is counted. Tokens appended later go after the padding, so within a head the
cache order is still the order of positions.

Keys keep the rotary phase of their original position, so after eviction a cache index no longer
equals a position: the engine passes explicit ``position_ids`` and ``kvbench.attention`` masks by
the cache's own layout.

Methods that accumulate per-entry state (H2O's attention sums, a gate's per-token scores) keep it
in ``layer.state``: tensors of shape ``(batch, kv_heads, entries)`` that are gathered, padded and
rolled back with the keys, and counted in the bytes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer


def cache_argument(model: torch.nn.Module, cache) -> dict:
    """The cache as the model's forward wants it: transformers 5.24 renamed ``past_key_values`` to
    ``cache`` and drops the old name in 5.40; earlier 5.x releases know only the old one."""
    return {_cache_parameter(type(model)): cache}


@functools.cache
def _cache_parameter(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def nbytes_of(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


class EvictableLayer(DynamicLayer):
    """One layer's keys and values, with eviction, truncation and per-entry state."""

    compressible = True  # False: eviction leaves the layer alone (a sliding window, ``kvbench.core.sliding``)

    def __init__(self):
        super().__init__()
        self.valid: torch.Tensor | None = None  # (B, H, L) bool; None: every entry is real
        self.state: dict[str, torch.Tensor] = {}

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.valid is not None:
            new = key_states.shape[2]
            self.valid = torch.cat([self.valid, self.valid.new_ones(*self.valid.shape[:2], new)], dim=2)
        return keys, values

    def keep(self, mask: torch.Tensor) -> None:
        """Keep the entries where ``mask (B, H, L)`` is True, padding heads to the fullest one."""
        if self.valid is not None:
            mask = mask & self.valid
        counts = mask.sum(dim=-1)
        width = int(counts.max())
        # kept positions first, in their original order (a stable sort of "evicted?")
        order = (~mask).to(torch.int8).argsort(dim=-1, stable=True)[..., :width]
        self.keys = self._gather(self.keys, order)
        self.values = self._gather(self.values, order)
        self.state = {name: value.gather(2, order) for name, value in self.state.items()}
        uniform = bool((counts == width).all())
        self.valid = None if uniform else torch.arange(width, device=mask.device) < counts.unsqueeze(-1)

    @staticmethod
    def _gather(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        return tensor.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1])).contiguous()

    def truncate(self, length: int) -> None:
        """Drop every entry after the first ``length`` (rolls back appended question/answer tokens)."""
        if length >= self.length:
            return
        self.keys = self.keys[:, :, :length].contiguous()
        self.values = self.values[:, :, :length].contiguous()
        if self.valid is not None:
            self.valid = self.valid[:, :, :length]
        self.state = {name: value[:, :, :length] for name, value in self.state.items()}

    def empty(self) -> "EvictableLayer":
        """A new, empty layer configured like this one (subclasses carry their settings over)."""
        return EvictableLayer()

    def clone(self) -> "EvictableLayer":
        twin = self.empty()
        if self.is_initialized:
            twin.lazy_initialization(self.keys, self.values)
            twin.keys, twin.values = self.keys.clone(), self.values.clone()
        twin.valid = None if self.valid is None else self.valid.clone()
        twin.state = {name: value.clone() for name, value in self.state.items()}
        return twin

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def length(self) -> int:
        """Slots per head, padding included."""
        return self.get_seq_length()

    def slide(self) -> None:
        """Drop what no later query can see; a full-attention layer drops nothing."""

    def full_length(self, tokens: int) -> int:
        """Entries per head the uncompressed layer holds after ``tokens`` tokens."""
        return tokens

    def entries(self) -> int:
        """Real (unpadded) entries over all heads, batch 1."""
        if not self.is_initialized:
            return 0
        if self.valid is None:
            return self.keys.shape[1] * self.keys.shape[2]
        return int(self.valid.sum())

    def entry_bytes(self) -> int:
        """Bytes of one entry's key and value."""
        return 2 * self.keys.shape[-1] * self.keys.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes allocated: keys, values, padding, the validity mask and method state."""
        if not self.is_initialized:
            return 0
        return (nbytes_of(self.keys) + nbytes_of(self.values) + nbytes_of(self.valid)
                + sum(nbytes_of(v) for v in self.state.values()))


class EvictableCache(Cache):
    """A cache of :class:`EvictableLayer` s, one per decoder layer, with byte accounting."""

    # Truncating back to recorded lengths restores the cache as it was (see :meth:`rollback`).
    # False for a cache that reorganises itself as tokens arrive: answers then work on a clone.
    rollback_restores = True
    # How a decoded token attends over this cache (kvbench.core.attention.DECODE_KERNELS); "auto":
    # the padded layout's masked SDPA, the packed layout's Triton kernel on CUDA where it runs
    decode_kernels = "auto"

    def __init__(self, num_layers: int, layers: list[EvictableLayer] | None = None):
        super().__init__(layers=layers if layers is not None else [EvictableLayer() for _ in range(num_layers)])
        # False while several methods keep state in this cache (a shared prefill): then none of it is
        # counted in nbytes, and each method is charged only its own (``state_bytes(prefix)``)
        self.count_state = True
        self.peak_bytes = 0  # high-water mark of nbytes
        self.peak_kv_bytes = 0  # the same without method state: what a prefill shared by methods costs each

    def feeding(self) -> contextlib.AbstractContextManager:
        """Entered around every forward pass that appends to this cache; a cache that needs more
        than keys and values from the model (KV-Direct's residuals) installs its hooks here."""
        return contextlib.nullcontext()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:  # once per forward: every layer has grown by now
            self.note_peak()
        return keys, values

    def note_peak(self, transient: int = 0) -> None:
        """Raise the high-water marks to what is held now, plus ``transient`` bytes alive meanwhile."""
        held = self.nbytes + transient
        self.peak_bytes = max(self.peak_bytes, held)
        self.peak_kv_bytes = max(self.peak_kv_bytes, held - (self.state_bytes() if self.count_state else 0))

    def reset_peak(self) -> None:
        self.peak_bytes = self.peak_kv_bytes = 0
        self.note_peak()

    def state_bytes(self, prefix: str = "") -> int:
        """Bytes of method state whose keys start with ``prefix`` (every method's by default)."""
        return sum(nbytes_of(v) for layer in self.layers for k, v in layer.state.items() if k.startswith(prefix))

    @property
    def nbytes(self) -> int:
        """Bytes physically allocated in every layer (see :attr:`EvictableLayer.nbytes`); method
        state only while ``count_state``."""
        total = sum(layer.nbytes for layer in self.layers)
        return total if self.count_state else total - self.state_bytes()

    def kept_bytes(self) -> int:
        """Bytes the real entries' keys and values need, without padding, masks or state."""
        return sum(layer.entries() * layer.entry_bytes() for layer in self.layers if layer.is_initialized)

    def entries(self) -> int:
        """Real KV entries held, summed over layers and KV heads (batch 1)."""
        return sum(layer.entries() for layer in self.layers)

    def compressible_entries(self) -> int:
        """Real KV entries held in the layers eviction may shrink: what ratios are measured over."""
        return sum(layer.entries() for layer in self.layers if layer.compressible)

    def full_entries(self, tokens: int) -> int:
        """Entries the full cache holds for ``tokens`` tokens in the layers eviction may shrink: one
        per token, layer and KV head (sliding-window layers, never compressed, are left out)."""
        return tokens * sum(layer.kv_heads for layer in self.layers if layer.compressible)

    def full_bytes(self, tokens: int) -> int:
        """Bytes of the full cache's keys and values for ``tokens`` tokens (a sliding-window layer
        holds at most its window)."""
        return sum(layer.full_length(tokens) * layer.kv_heads * layer.entry_bytes() for layer in self.layers)

    def slide(self) -> None:
        """Trim every sliding-window layer to what later queries can see (after a prefill chunk)."""
        for layer in self.layers:
            layer.slide()

    def lengths(self) -> list[int]:
        return [layer.length for layer in self.layers]

    def rollback(self, lengths: list[int]) -> None:
        """Truncate each layer back to a length recorded with :meth:`lengths`."""
        for layer, length in zip(self.layers, lengths):
            layer.truncate(length)

    def retain_state(self, prefix: str | None) -> None:
        """Drop every layer's method state except the entries whose keys start with ``prefix`` (a
        method's ``state_prefix``; None: drop all). What stays is one method's, so it is counted."""
        for layer in self.layers:
            layer.state = {k: v for k, v in layer.state.items() if prefix and k.startswith(prefix)}
        self.count_state = True

    def clone(self) -> "EvictableCache":
        twin = copy.copy(self)
        twin.layers = [layer.clone() for layer in self.layers]
        return twin
