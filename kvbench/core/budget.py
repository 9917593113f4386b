"""Turning scores into a kept set: protected positions, budgets and top-k, shared by every method.

A method only says how much each KV entry matters (``scores``: ``batch, kv_heads, slots``, higher
keeps). What is always kept and how many entries are kept where is decided here, once:

- ``uniform``: every layer and every KV head keeps the same number of entries (tensors shrink
  without padding);
- ``layer``: every layer keeps the same number of entries, shared among its heads by one
  threshold per layer (heads differ, so the layer is padded to its fullest head);
- ``global``: one threshold over all layers and heads, as KVzip and Fast KVzip do.

Budgets are a fraction of the tokens *seen* so far (context, question and generated tokens), so
evicting again during chunked prefill or decoding keeps the target ratio of everything seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SINKS = 4  # the first 4 tokens are never evicted (attention sinks), except by `random`
ALLOCATIONS = ("uniform", "layer", "global")


@dataclass(frozen=True)
class Budget:
    """How much of what was seen a method keeps, and how the kept entries are shared out.

    ``ratio`` is the fraction of entries evicted, in [0, 1); ``None`` is threshold mode, where the
    method decides entry by entry (KVzap's τ) and the ratio is only measured. ``allocation`` shares
    the kept entries among layers and heads (see the module docstring). Invalid values raise here,
    so nothing downstream decodes a NaN or re-checks a range.
    """

    ratio: float | None
    allocation: str = "uniform"

    def __post_init__(self) -> None:
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and math.isfinite(self.ratio)
                                           and 0.0 <= self.ratio < 1.0):
            raise ValueError(f"ratio {self.ratio} is outside [0, 1): it is the fraction of the context evicted")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r} (choose {', '.join(ALLOCATIONS)})")

    @property
    def threshold_mode(self) -> bool:
        return self.ratio is None

    def kept(self, seen: int) -> int:
        """Entries one head keeps out of ``seen`` (all of them in threshold mode, before the threshold)."""
        return seen if self.ratio is None else kept_count(seen, self.ratio)


def protect(scores: torch.Tensor, first: int = SINKS, last: int = 0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Give the first ``first`` slots and each head's ``last`` most recent entries an infinite score
    (always kept); with a padded layout (``valid``), recent entries are counted among real ones and
    padding scores -inf (never kept).

    Kept entries stay first in their head, in order, so the first slots are the first tokens; a
    head's most recent tokens are its last real entries, wherever padding left them.
    """
    scores = scores.clone()
    total = scores.shape[-1]
    scores[..., : min(first, total)] = float("inf")
    if last > 0 and valid is None:
        scores[..., max(total - last, 0) :] = float("inf")
    elif last > 0:
        later = valid.flip(-1).int().cumsum(-1).flip(-1)  # real entries at or after each slot
        scores = scores.masked_fill(valid & (later <= last), float("inf"))
    return scores if valid is None else scores.masked_fill(~valid, float("-inf"))


def kept_count(seen: int, ratio: float) -> int:
    """Entries one head keeps out of ``seen`` when a fraction ``ratio`` is evicted."""
    return seen - round(ratio * seen)


def _top(flat: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` highest entries of each row of ``flat``.

    Protected (+inf) entries are always kept, even beyond ``count``: the measured ratio then says
    so. Hidden (-inf) entries are never kept.
    """
    n_protected = int(torch.isposinf(flat).sum(-1).max())
    n_real = int(torch.isfinite(flat).sum(-1).min()) + n_protected
    count = min(max(count, n_protected), n_real, flat.shape[-1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    return mask.scatter_(-1, flat.topk(count, dim=-1, sorted=False).indices, True)


def select(scores: list[torch.Tensor], seen: int, budget: Budget,
           per_layer: list[int] | None = None, outside: int = 0) -> list[torch.Tensor]:
    """Keep masks ``(B, H, slots)`` per layer under ``budget`` (a ratio); hidden slots must score -inf.

    ``per_layer`` gives each layer its own per-head kept count (PyramidKV's pyramid) instead of
    ``budget.kept(seen)`` everywhere; it applies to ``uniform`` and ``layer`` allocation.
    ``outside``: protected entries per head kept on top of the budget, which is then a ratio of the
    other ``seen - outside`` tokens (KVzap keeps its window outside what its rule decides).
    """
    if budget.threshold_mode:
        raise ValueError("select() cuts to a ratio; in threshold mode the method's keep_mask decides")
    allocation = budget.allocation
    if per_layer is not None and (allocation == "global" or outside):
        raise ValueError("per-layer budgets exclude a global budget and entries kept outside the budget")
    kept = budget.kept(max(seen - outside, 0)) + outside
    budgets = per_layer if per_layer is not None else [kept] * len(scores)
    if allocation == "uniform":
        return [_top(s, n) for s, n in zip(scores, budgets)]
    if allocation == "layer":
        return [_top(s.flatten(1), n * s.shape[1]).view_as(s) for s, n in zip(scores, budgets)]
    flat = torch.cat([s.flatten(1) for s in scores], dim=1)
    mask = _top(flat, kept * sum(s.shape[1] for s in scores))
    return [part.view_as(s) for part, s in zip(mask.split([s[0].numel() for s in scores], dim=1), scores)]


def protect_top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Give each head's ``count`` best slots an infinite score: a per-head floor under a shared
    budget (AdaKV's safeguard keeps ``alpha`` of the per-head budget in every head)."""
    if count <= 0:
        return scores
    count = min(count, scores.shape[-1])
    return scores.scatter(-1, scores.topk(count, dim=-1).indices, float("inf"))
