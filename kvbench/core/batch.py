"""Greedy decoding of several compressed caches of one context at once: a sweep's cells as one batch.

Why: a sweep answers every question once per (method, budget) cell, and each greedy token of each
answer reads all the model's weights. Decoding the cells of a context together reads them once per
token for the whole batch.

How: the cells' caches are stacked along the batch dimension in the padded layout
(:class:`kvbench.core.cache.EvictableLayer`'s coordinates): every layer is as long as the longest
head of any cell, and a validity mask hides the padding, which kvbench's attention already honours
(:func:`kvbench.core.attention.kvbench_attention`). The question is prefilled for every row at once
and the rows decode in lockstep (they all stand at the same position: same context, same question).
A row that finishes — end of sequence, ``max_new_tokens``, or a stop string, checked at the very
token counts :meth:`kvbench.core.session.Session.answer` checks them — is dropped from the batch.

Only cells whose cache nothing changes while answering can be batched (:func:`batchable`): methods
that evict while decoding and caches a method manages itself (KV-Direct) are answered one at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from kvbench.core import engine
from kvbench.core.cache import EvictableCache, EvictableLayer, nbytes_of

# The cells held for a batch, and then the batch's stacked cache (an extra copy of them, padded), may
# each take at most this share of the memory available when they are checked: the device's free
# memory on CUDA, the system's available memory on the CPU.
BATCH_MEMORY_SHARE = 0.25


def batchable(compressed, evict_while_decoding: bool, decode_interval: int | None) -> bool:
    """Whether a compressed cell (:class:`kvbench.core.session.Compressed`) can join a batch: its
    cache is kvbench's own (not a method's: KV-Direct) and stays as it is while answering."""
    evicts = evict_while_decoding and compressed.decode_evicts and bool(decode_interval)
    return (not evicts and not compressed.method.manages_cache and type(compressed.cache) is EvictableCache
            and compressed.cache.rollback_restores)


class StackedLayer(EvictableLayer):
    """One decoder layer of several caches stacked as batch rows, padded to the longest head, with
    ``room`` preallocated slots after it for the question and the answer (appending writes in
    place instead of concatenating the whole layer every token)."""

    def __init__(self, sources: Sequence[EvictableLayer], room: int):
        super().__init__()
        width = max(layer.length for layer in sources)
        keys, values = sources[0].keys, sources[0].values
        rows, heads = len(sources), keys.shape[1]
        self._keys = keys.new_zeros(rows, heads, width + room, keys.shape[-1])  # zeros: padding is read, masked
        self._values = values.new_zeros(rows, heads, width + room, values.shape[-1])
        self._valid = torch.zeros(rows, heads, width + room, dtype=torch.bool, device=keys.device)
        for row, layer in enumerate(sources):
            n = layer.length
            self._keys[row, :, :n] = layer.keys[0]
            self._values[row, :, :n] = layer.values[0]
            self._valid[row, :, :n] = True if layer.valid is None else layer.valid[0]
        self.padded = not bool(self._valid[:, :, :width].all())  # else no mask: the plain SDPA path
        self.device, self.is_initialized = keys.device, True
        self._show(width)

    def _show(self, length: int) -> None:
        """Expose the first ``length`` slots as the layer's keys, values and mask."""
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]
        self.valid = self._valid[:, :, :length] if self.padded else None

    def get_seq_length(self) -> int:
        return self.keys.shape[2]

    def update(self, key_states, value_states, *args, **kwargs):
        start, new = self.length, key_states.shape[2]
        if start + new > self._keys.shape[2]:  # more than the room asked for: grow
            grow = start + new - self._keys.shape[2]
            self._keys = torch.cat([self._keys, self._keys.new_zeros(*self._keys.shape[:2], grow, self._keys.shape[3])], 2)
            self._values = torch.cat([self._values, self._values.new_zeros(*self._values.shape[:2], grow,
                                                                          self._values.shape[3])], 2)
            self._valid = torch.cat([self._valid, self._valid.new_zeros(*self._valid.shape[:2], grow)], 2)
        self._keys[:, :, start:start + new] = key_states
        self._values[:, :, start:start + new] = value_states
        self._valid[:, :, start:start + new] = True
        self._show(start + new)
        return self.keys, self.values

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch ``rows`` (the unfinished answers): new, smaller buffers."""
        length = self.length
        self._keys, self._values, self._valid = self._keys[rows], self._values[rows], self._valid[rows]
        self._show(length)

    @property
    def nbytes(self) -> int:
        """The buffers as allocated: padding, mask and the room not yet written included."""
        return nbytes_of(self._keys) + nbytes_of(self._values) + nbytes_of(self._valid)


def stacked_bytes(caches: Sequence[EvictableCache], room: int) -> int:
    """Bytes :func:`stack` allocates for ``caches`` (computed from their shapes, nothing copied)."""
    total = 0
    for layers in zip(*(cache.layers for cache in caches)):
        slots = len(layers) * layers[0].kv_heads * (max(layer.length for layer in layers) + room)
        total += slots * (layers[0].entry_bytes() + 1)  # keys, values and the mask's byte
    return total


def stack(caches: Sequence[EvictableCache], room: int) -> EvictableCache:
    """One cache whose batch row ``i`` holds ``caches[i]`` (each of batch 1), layer by layer."""
    stacked = EvictableCache(0, [StackedLayer(layers, room) for layers in zip(*(c.layers for c in caches))])
    stacked.reset_peak()
    return stacked


def groups(caches: Sequence[EvictableCache], room: int, max_rows: int, max_bytes: int) -> list[list[int]]:
    """Indices of ``caches`` split into batches of at most ``max_rows`` whose stack stays within
    ``max_bytes`` (a single cache always forms a batch). Caches of similar length go together, so
    little is padded: sorted by their longest heads, longest first."""
    slots = [sum(layer.length for layer in cache.layers) for cache in caches]
    order = sorted(range(len(caches)), key=lambda i: -slots[i])
    batches: list[list[int]] = []
    for index in order:
        current = batches[-1] if batches else None
        if current is not None and len(current) < max_rows and \
                stacked_bytes([caches[i] for i in current + [index]], room) <= max_bytes:
            current.append(index)
        else:
            batches.append([index])
    return batches


def memory_cap(device: torch.device) -> int:
    """The most the held cells, or one batch's stacked cache, may take: :data:`BATCH_MEMORY_SHARE`
    of the memory available now on ``device``."""
    return int(BATCH_MEMORY_SHARE * available_bytes(device))


def available_bytes(device: torch.device) -> int:
    """Free CUDA memory, or the system's available memory (Linux's ``MemAvailable``: free plus what
    the page cache gives back; elsewhere the free pages)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class _Row:
    """One answer being decoded, with the stop-string checks :meth:`Session._greedy` makes: after
    :data:`engine.STOP_CHECK_FIRST` tokens, then twice as many more each time, and when it ends."""

    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0
    checked: int = 0  # tokens already checked for a stop string
    chunk: int = engine.STOP_CHECK_FIRST
    check_at: int = engine.STOP_CHECK_FIRST

    def take(self, token: int, max_new: int, eos_ids: set[int], stop_at) -> bool:
        """Add greedy's ``token``; False once the answer is complete."""
        if token in eos_ids:
            self._cut(stop_at)
            return False
        self.tokens.append(token)
        count = len(self.tokens)
        if stop_at is not None and (count == self.check_at or count >= max_new):
            if self._cut(stop_at):
                return False
            self.checked, self.chunk = count, self.chunk * 2
            self.check_at = count + self.chunk
        return count < max_new

    def _cut(self, stop_at) -> bool:
        cut = stop_at(self.tokens, self.checked) if stop_at is not None else None
        if cut is not None:
            self.tokens = self.tokens[:cut]
        return cut is not None


@torch.inference_mode()
def greedy(model: PreTrainedModel, cache: EvictableCache, first_logits: torch.Tensor, next_position: int,
           max_new_tokens: int, eos_ids: set[int],
           stop_at: Callable[[list[int], int], int | None] | None = None) -> list[tuple[list[int], float]]:
    """Greedy answers of every batch row of ``cache`` from ``first_logits (rows, vocab)``: per row,
    its tokens and its share of the decoding time (each step's wall time split evenly among the rows
    still decoding in it). ``stop_at(tokens, checked)``: where a stop string cuts ``tokens`` (None:
    it does not), as :func:`kvbench.core.session._stop_at`. Finished rows leave the batch."""
    rows = [_Row() for _ in range(first_logits.shape[0])]
    active = list(range(len(rows)))  # batch row i of the cache is answer active[i]
    logits = first_logits
    for step in range(max_new_tokens):
        with engine.Timer(first_logits.device) as timer:
            picks = logits.argmax(dim=-1).tolist()
            going = [i for i, (row, token) in enumerate(zip(active, picks))
                     if rows[row].take(token, max_new_tokens, eos_ids, stop_at)]
            if going and len(going) < len(active):
                held = cache.nbytes
                index = torch.tensor(going, device=first_logits.device)
                for layer in cache.layers:
                    layer.select(index)
                cache.note_peak(transient=held)  # old and new buffers are both alive while copying
            if going:
                ids = torch.tensor([[picks[i]] for i in going], device=first_logits.device)
                logits = engine.forward(model, cache, ids, next_position + step)
        for row in active:
            rows[row].seconds += timer.seconds / len(active)
        active = [active[i] for i in going]
        if not active:
            break
    return [(row.tokens, row.seconds) for row in rows]
