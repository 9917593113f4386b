"""One decoded token's attention over a ``(B, H, L, D)`` cache, every row and head at once: the CPU's
decode path.

Why not SDPA: on the CPU, PyTorch's SDPA kernel is slow for a single query token. On the development
machine (2 cores, bfloat16, SmolLM2-135M's 9 query / 3 KV heads over 1,088 entries) it took 0.75 ms
per layer for one row and 12 ms for 16, where the two matmuls below take 0.43 ms and 4.7 ms; at 16
rows SDPA was 90% of a decoding step. Batched decoding stacks many cells, so this matters most there.

The arithmetic is :func:`kvbench.kernels.reference.decode_attention_padded`'s (float32 logits,
softmax and weighted sum; a head with no valid entry gives zeros), batched: the query group of a
KV head is a matrix of ``G`` rows against that head's keys.
"""

from __future__ import annotations

import torch


def decode_attention_grouped(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``q (B, Hq, D)`` over ``keys/values (B, H, L, D)``, entries where ``valid (B, H, L)`` is False
    hidden (None: all valid); query head ``hq`` reads KV head ``hq // (Hq // H)``. Returns ``(B, Hq, D)``
    in ``q``'s dtype."""
    batch, query_heads, dim = q.shape
    heads = keys.shape[1]
    grouped = q.float().view(batch, heads, query_heads // heads, dim)
    logits = torch.matmul(grouped, keys.float().transpose(-1, -2)) * scale  # (B, H, G, L)
    if valid is not None:
        logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    if valid is not None:  # a head with nothing valid: softmax of all -inf is NaN; it attends to nothing
        weights = weights.nan_to_num(0.0)
    out = torch.matmul(weights, values.float())
    return out.view(batch, query_heads, dim).to(q.dtype)
