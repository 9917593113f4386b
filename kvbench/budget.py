"""Turning scores into a kept set: protected positions, budgets and top-k, shared by every method.

A method only says how much each KV entry matters (``scores``: ``batch, kv_heads, entries``,
higher keeps). What is always kept and how many entries each head keeps is decided here, once.
"""

from __future__ import annotations

import torch

SINKS = 4  # DESIGN §3: the first 4 tokens are never evicted (attention sinks), except by `random`


def protect(scores: torch.Tensor, first: int = SINKS, last: int = 0) -> torch.Tensor:
    """Give the first ``first`` and the last ``last`` entries an infinite score (always kept)."""
    scores = scores.clone()
    total = scores.shape[-1]
    scores[..., : min(first, total)] = float("inf")
    if last > 0:
        scores[..., max(total - last, 0) :] = float("inf")
    return scores


def uniform_budget(total: int, ratio: float) -> int:
    """Entries each head keeps when a fraction ``ratio`` of ``total`` is evicted."""
    return total - round(ratio * total)


def uniform_keep(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices ``(batch, kv_heads, n_keep)``, ascending, of the highest-scoring entries per head.

    Every head keeps the same number of entries (the ``uniform`` allocation), so the cache tensors
    shrink physically. Protected (infinite-score) entries are always kept, even when that means
    evicting fewer than asked: the measured ratio then says so.
    """
    total = scores.shape[-1]
    n_protected = int(torch.isinf(scores).sum(-1).max()) if total else 0
    n_keep = min(total, max(uniform_budget(total, ratio), n_protected))
    return scores.topk(n_keep, dim=-1, sorted=False).indices.sort(dim=-1).values
