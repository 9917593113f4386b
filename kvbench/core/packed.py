"""The packed cache layout: each layer's kept keys and values of all KV heads in one buffer, head
after head, with per-head offsets and lengths — no padding, whatever the heads keep.

Why: ``layer`` and ``global`` allocation leave the KV heads of a layer with very unequal numbers of
entries, and the padded layout (:class:`kvbench.core.cache.EvictableLayer`) stores every head as
long as the fullest one. Fast KVzip stores heads back to back (``cu_len_k``) and runs
variable-length attention; this layout does the same.

Storage, per layer (batch ``B``, KV heads ``H``, segments ``S = B * H``): ``keys, values (N, D)``
where segment ``s = b * H + h`` owns rows ``[start[s], start[s] + capacity[s])``, of which the first
``length[s]`` are real entries in cache order and the rest slack. Eviction compacts to exactly the
kept rows (no slack); appending writes into the slack, and when a head has no room the layer is
repacked with ``decode_slack`` spare rows per head for single-token appends (decoding) and none for
longer ones (prefill chunks, questions): the slack is real memory and is counted in ``nbytes``.

Methods, budgets and tests keep seeing the padded layout's coordinates: a *slot* view where head
``s``'s entries kept at the last eviction (``base[s]`` of them) sit at slots ``0..base[s]-1``,
padding up to ``width = max(base)``, and the ``appended`` tokens since then at slots
``width..width+appended-1`` for every head — exactly where :class:`EvictableLayer` puts them. So
``keys``/``values`` (materialised on demand; a free view when every head holds the same entries),
``valid``, scores, keep masks and method ``state`` are what they would be in the padded layout.

Attention reads the buffer directly (:meth:`PackedLayer.attend`): one SDPA over a strided view when
the heads are equal, else one SDPA per KV head over its own segment with its query group, or on
CUDA the Triton packed decode kernel (:mod:`kvbench.kernels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvbench.kernels import decode_attention_packed, resolve_backend
from kvbench.core.cache import EvictableLayer, nbytes_of

DEFAULT_DECODE_SLACK = 32  # spare rows per head reserved when decoding outgrows a segment


class PackedLayer(EvictableLayer):
    """One layer's keys and values packed head after head, with the padded layout's slot view."""

    def __init__(self, decode_slack: int = DEFAULT_DECODE_SLACK, backend: str = "auto"):
        self._keys: torch.Tensor | None = None  # (N, D)
        self._values: torch.Tensor | None = None
        super().__init__()
        self.decode_slack, self.backend = decode_slack, backend
        self.batch = self.heads = 0
        self.base: list[int] = []  # per segment: entries kept at the last eviction
        self.start: list[int] = []
        self.capacity: list[int] = []
        self.width = 0  # max(base): slots before the appended tokens
        self.appended = 0  # tokens appended to every head since the last eviction
        self._offsets: torch.Tensor | None = None
        self._uniform: bool | None = None
        self.repacks = 0  # how often appending outgrew the slack (benchmarks read it)
        self._rows: torch.Tensor | None = None  # buffer row of every valid slot, in slot order

    # -- the padded layout's view ---------------------------------------------------------------

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._padded(self._keys)

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._store(value, "_keys")

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._padded(self._values)

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._store(value, "_values")

    def _store(self, padded: torch.Tensor | None, name: str) -> None:
        """Write a padded ``(B, H, slots, D)`` tensor's valid slots back into the buffer (a method
        that rewrites keys: key re-rotation); None before initialisation."""
        if padded is None or getattr(self, name) is None:
            setattr(self, name, padded if padded is None else padded.flatten(0, 2).clone())
            return
        buffer = getattr(self, name)
        if self.uniform:
            self._uniform_view(buffer).copy_(padded)
            return
        buffer[self.rows()] = padded.flatten(0, 2)[self._valid_slots()].to(buffer.dtype)

    @property
    def lengths_per_head(self) -> list[int]:
        return [b + self.appended for b in self.base]

    @property
    def uniform(self) -> bool:
        """Every head holds the same entries in evenly spaced segments: the buffer is a strided
        ``(B, H, length, D)`` tensor."""
        if self._uniform is None:
            self._uniform = all(b == self.width for b in self.base) \
                and all(c == self.capacity[0] for c in self.capacity) \
                and all(s == i * self.capacity[0] for i, s in enumerate(self.start))
        return self._uniform

    @property
    def offsets(self) -> torch.Tensor | None:
        """``(3, S)`` int64 on the device: start, length, capacity per segment (the Triton kernel's
        input), built when first read after a change and counted in :attr:`nbytes` either way."""
        if self._offsets is None and self.is_initialized:
            self._offsets = torch.tensor([self.start, self.lengths_per_head, self.capacity], dtype=torch.int64,
                                         device=self._keys.device)
        return self._offsets

    def _uniform_view(self, buffer: torch.Tensor) -> torch.Tensor:
        cap = self.capacity[0] if self.capacity else 0
        view = buffer[: len(self.start) * cap].view(self.batch, self.heads, cap, buffer.shape[-1])
        return view[:, :, : self.width + self.appended]

    def _padded(self, buffer: torch.Tensor) -> torch.Tensor:
        if self.uniform:
            return self._uniform_view(buffer)
        out = buffer.new_zeros(self.batch, self.heads, self.length, buffer.shape[-1])
        out.view(-1, buffer.shape[-1])[self._valid_slots()] = buffer[self.rows()]
        return out

    def _valid_slots(self) -> torch.Tensor:
        """Flat ``(B*H*slots,)`` bool of the real slots (all True when every head is full)."""
        valid = self.valid
        if valid is None:
            return torch.ones(self.batch * self.heads * self.length, dtype=torch.bool, device=self._keys.device)
        return valid.flatten()

    @property
    def valid(self) -> torch.Tensor | None:
        """``(B, H, slots)`` bool, True at real entries; None when every head is full."""
        if not self.is_initialized or self.uniform or all(b == self.width for b in self.base):
            return None
        device = self._keys.device
        base = torch.tensor(self.base, device=device).view(self.batch, self.heads, 1)
        slots = torch.arange(self.length, device=device)
        return (slots < base) | (slots >= self.width)

    @valid.setter
    def valid(self, value) -> None:  # EvictableLayer.__init__ assigns None
        if value is not None:
            raise AttributeError("a packed layer derives its validity from its per-head lengths")

    def rows(self) -> torch.Tensor:
        """The buffer row of every real entry, segment by segment in cache order (slot order)."""
        if self._rows is None:
            device = self._keys.device
            pieces = [torch.arange(s, s + n, device=device) for s, n in zip(self.start, self.lengths_per_head)]
            self._rows = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)
        return self._rows

    # -- transformers' layer interface ------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.batch, self.heads = key_states.shape[:2]
        segments = self.batch * self.heads
        self._keys = key_states.new_empty(0, key_states.shape[-1])
        self._values = value_states.new_empty(0, value_states.shape[-1])
        self.base, self.start, self.capacity = [0] * segments, [0] * segments, [0] * segments
        self.width = self.appended = 0
        self.is_initialized = True
        self._changed()

    def get_seq_length(self) -> int:
        return self.width + self.appended if self.is_initialized else 0

    def update(self, key_states, value_states, *args, **kwargs):
        """Append ``(B, H, n, D)`` new keys and values at the end of every head's segment.

        Returns the padded view when the heads are equal (a free strided view: any attention works),
        else only the new entries: :func:`kvbench.core.attention.kvbench_attention` then reads the
        buffer itself (:meth:`attend`).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        lengths = self.lengths_per_head
        if any(length + n > cap for length, cap in zip(lengths, self.capacity)):
            self._repack(n, self.decode_slack if n == 1 else 0)
            lengths = self.lengths_per_head
        ends = torch.tensor([s + length for s, length in zip(self.start, lengths)], device=self._keys.device)
        dest = (ends.unsqueeze(1) + torch.arange(n, device=ends.device)).flatten()
        self._keys.index_copy_(0, dest, key_states.reshape(-1, key_states.shape[-1]).to(self._keys.dtype))
        self._values.index_copy_(0, dest, value_states.reshape(-1, value_states.shape[-1]).to(self._values.dtype))
        self.appended += n
        self._changed()
        if self.uniform:
            return self.keys, self.values
        return key_states, value_states

    def _repack(self, incoming: int, slack: int) -> None:
        """Move every segment into a new buffer with room for ``incoming`` more rows plus ``slack``."""
        lengths = self.lengths_per_head
        capacity = [length + incoming + slack for length in lengths]
        start = [sum(capacity[:i]) for i in range(len(capacity))]
        rows = self.rows()
        dest = torch.cat([torch.arange(s, s + length, device=rows.device) for s, length in zip(start, lengths)])
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            new = old.new_empty(sum(capacity), old.shape[-1])
            new[dest] = old[rows]
            setattr(self, name, new)
        self.start, self.capacity = start, capacity
        self.repacks += 1
        self._changed()

    def _changed(self) -> None:
        self._rows = self._offsets = self._uniform = None

    # -- eviction and rollback ------------------------------------------------------------------

    def keep(self, mask: torch.Tensor) -> None:
        """Keep the entries where ``mask (B, H, slots)`` is True: the kept rows are copied into an
        exactly sized buffer (no slack), in cache order."""
        valid = self.valid
        if valid is not None:
            mask = mask & valid
        counts = mask.sum(dim=-1).flatten().tolist()
        chosen = mask.flatten() if valid is None else mask.flatten()[valid.flatten()]
        kept = self.rows()[chosen]
        self._keys, self._values = self._keys[kept], self._values[kept]
        width = max(counts, default=0)
        order = (~mask).to(torch.int8).argsort(dim=-1, stable=True)[..., :width]
        self.state = {name: value.gather(2, order) for name, value in self.state.items()}
        self.base, self.capacity = counts, list(counts)
        self.start = [sum(counts[:i]) for i in range(len(counts))]
        self.width, self.appended = width, 0
        self._changed()

    def truncate(self, length: int) -> None:
        """Drop every slot after the first ``length`` (rolls back appended question/answer tokens),
        and give back the slack appending reserved, so the layer is as it was."""
        if length >= self.length:
            return
        if length < self.width:
            raise ValueError(f"a packed layer rolls back appended tokens only: {length} < {self.width} slots kept")
        self.appended = length - self.width
        self.state = {name: value[:, :, :length] for name, value in self.state.items()}
        self._changed()
        self._repack(0, 0)
        self.repacks -= 1  # a rollback, not an append outgrowing the slack

    def empty(self) -> "PackedLayer":
        return PackedLayer(self.decode_slack, self.backend)

    def clone(self) -> "PackedLayer":
        twin = self.empty()
        if self.is_initialized:
            twin.__dict__.update({k: v for k, v in self.__dict__.items()
                                  if k not in ("state", "_rows", "_offsets", "_uniform")})
            twin._keys, twin._values = self._keys.clone(), self._values.clone()
            twin.base, twin.start, twin.capacity = list(self.base), list(self.start), list(self.capacity)
            twin._changed()
        twin.state = {name: value.clone() for name, value in self.state.items()}
        return twin

    # -- sizes ----------------------------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        return self.heads

    def entries(self) -> int:
        return sum(self.lengths_per_head) if self.is_initialized else 0

    def entry_bytes(self) -> int:
        return 2 * self._keys.shape[-1] * self._keys.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes allocated: the buffers with their slack, the offsets, and method state."""
        if not self.is_initialized:
            return 0
        return (nbytes_of(self._keys) + nbytes_of(self._values) + 3 * len(self.start) * 8  # + offsets
                + sum(nbytes_of(v) for v in self.state.values()))

    # -- attention ------------------------------------------------------------------------------

    def attend(self, query: torch.Tensor, scale: float | None, backend: str | None = None) -> torch.Tensor:
        """``query (B, Hq, q, D)`` of the ``q`` newest tokens over this layer; returns ``(B, q, Hq, D)``.

        Query ``i`` sees its head's entries up to ``length - q + i`` (the newest tokens end every
        segment). Equal heads: one SDPA over the strided view; otherwise per KV head, its query
        group against its own segment, or the Triton decode kernel on CUDA for a single token.
        """
        batch, q_heads, q_len, dim = query.shape
        group = q_heads // self.heads
        backend = backend or self.backend  # the cache's decode_kernels, if set, overrides the layer's
        backend = "torch" if backend == "sdpa" else backend  # SDPA per head is the PyTorch path here
        scale = dim ** -0.5 if scale is None else scale
        if self.uniform:
            keys, values = self._uniform_view(self._keys), self._uniform_view(self._values)
            mask = None if q_len == 1 else _causal(q_len, keys.shape[2], query.device)
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale,
                                                 enable_gqa=group != 1)
            return out.transpose(1, 2)
        if q_len == 1 and resolve_backend(backend, query.device) == "triton":
            out = decode_attention_packed(query[:, :, 0], self._keys, self._values, self.offsets[0],
                                                  self.offsets[1], group, scale, backend="triton",
                                                  max_length=max(self.lengths_per_head))
            return out.unsqueeze(1)
        out = query.new_empty(batch, q_len, q_heads, dim)
        for s, (first, length) in enumerate(zip(self.start, self.lengths_per_head)):
            b, h = divmod(s, self.heads)
            heads = slice(h * group, (h + 1) * group)
            if length == 0:
                out[b, :, heads] = 0
                continue
            # the group's queries stacked as rows of one head: (1, 1, G*q, D) against (1, 1, L, D)
            q = query[b, heads].reshape(1, 1, group * q_len, dim)
            k = self._keys[first:first + length].view(1, 1, length, dim)
            v = self._values[first:first + length].view(1, 1, length, dim)
            mask = None if q_len == 1 else _causal(q_len, length, query.device).repeat(group, 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            out[b, :, heads] = o.view(group, q_len, dim).transpose(0, 1)
        return out


def _causal(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    return torch.arange(kv_len, device=device).unsqueeze(0) <= rows
