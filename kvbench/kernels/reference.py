"""Plain PyTorch versions of the kernels: the fallback without Triton or CUDA, and the reference the
Triton kernels are tested against.

They are written to be obviously right rather than fast: one segment (one KV head of one batch row)
at a time, softmax in float32, nothing fused. Conventions shared with the Triton kernels:

- a segment of length 0 (a head that kept nothing) attends to nothing and outputs zeros, as does a
  padded head whose ``valid`` row is all False (SDPA would give NaN there);
- rows past a segment's ``length`` (slack) are never read, so whatever they hold cannot leak.
"""

from __future__ import annotations

import torch


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``q (G, D)`` over ``k, v (n, D)`` in float32; zeros when ``n == 0``."""
    if k.shape[0] == 0:
        return torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    weights = torch.softmax((q.float() @ k.float().T) * scale, dim=-1)
    return weights @ v.float()


def decode_attention_packed(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    group: int,
    scale: float,
) -> torch.Tensor:
    """One query token per batch row over the packed layout: ``q (B, Hq, D)`` → ``(B, Hq, D)``.

    Query head ``hq`` of row ``b`` attends over segment ``b * H + hq // group``, i.e. rows
    ``[start[s], start[s] + length[s])`` of ``keys``/``values (N, D)``.
    """
    batch, query_heads, _ = q.shape
    heads = query_heads // group
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    starts, lengths = start.tolist(), length.tolist()
    for b in range(batch):
        for h in range(heads):
            s = b * heads + h
            rows = slice(starts[s], starts[s] + lengths[s])
            queries = slice(h * group, (h + 1) * group)
            out[b, queries] = _attend(q[b, queries], keys[rows], values[rows], scale)
    return out.to(q.dtype)


def decode_attention_padded(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One query token per batch row over the padded layout: ``q (B, Hq, D)`` over
    ``keys/values (B, H, L, D)`` with ``valid (B, H, L)`` (None: all valid) → ``(B, Hq, D)``."""
    batch, query_heads, _ = q.shape
    heads = keys.shape[1]
    group = query_heads // heads
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(batch):
        for h in range(heads):
            rows = slice(None) if valid is None else valid[b, h]
            queries = slice(h * group, (h + 1) * group)
            out[b, queries] = _attend(q[b, queries], keys[b, h][rows], values[b, h][rows], scale)
    return out.to(q.dtype)


def segment_sizes(
    keep: torch.Tensor, valid: torch.Tensor | None, slack: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``start, length, capacity`` (int64, shape ``(B*H,)``) of the packed layout that holds the
    entries ``keep & valid`` of each head with ``slack`` spare rows per segment, heads back to back."""
    kept = keep if valid is None else keep & valid
    length = kept.flatten(0, 1).sum(-1, dtype=torch.int64)
    capacity = length + slack
    start = torch.cumsum(capacity, 0) - capacity
    return start, length, capacity


def compact(
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    slack: int,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather each head's kept entries of a padded layer ``(B, H, L, D)``, in cache order, into the
    packed layout with ``slack`` spare rows per segment, one head at a time.

    Returns ``(packed_keys, packed_values, start, length, capacity)``; slack rows are uninitialised.
    """
    if slack < 0:
        raise ValueError(f"slack must be >= 0, got {slack}")
    start, length, capacity = segment_sizes(keep, valid, slack)
    kept = (keep if valid is None else keep & valid).flatten(0, 1)
    total = int(capacity.sum())
    packed_keys = keys.new_empty((total, keys.shape[-1]))
    packed_values = values.new_empty((total, values.shape[-1]))
    flat_keys, flat_values = keys.flatten(0, 1), values.flatten(0, 1)
    for s, (first, n) in enumerate(zip(start.tolist(), length.tolist())):
        index = kept[s].nonzero().squeeze(1)
        packed_keys[first:first + n] = flat_keys[s, index]
        packed_values[first:first + n] = flat_values[s, index]
    return packed_keys, packed_values, start, length, capacity
