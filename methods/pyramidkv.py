"""PyramidKV: SnapKV's scores with budgets shrinking linearly from the first layer to the last.

PyramidKV (Cai et al., 2024, arXiv:2406.02069): SnapKV's scores, with budgets that shrink
linearly from the first layer to the last, the same total as a uniform budget.

kvpress: ``PyramidKVPress`` (defaults: SnapKV's window 64 and kernel 5, ``beta`` 20). Its budget
formula, from KVCache-Factory: with ``cap = window + T·(1 − ratio)``, the last layer keeps
``(cap − window)/beta``, the first ``2·(cap − window)`` minus that (at most ``T − window``), and a
context too short for that pyramid falls back to the uniform budget. The per-layer budgets go to
kvbench's shared selection (``budget.select(per_layer=...)``).
"""

from dataclasses import dataclass

import torch

from kvbench.core.budget import Budget, select
from kvbench.core.method import register_method
from kvbench.methods.snapkv import SnapKV


def pyramid_budgets(total: int, ratio: float, window: int, beta: float, layers: int) -> list[int]:
    """Per-layer, per-head kept counts for a context of ``total`` tokens (kvpress's formula)."""
    if beta < 1:
        raise ValueError("pyramidkv beta must be at least 1")
    capacity = window + total * (1 - ratio)
    low = (capacity - window) / beta
    high = (capacity - window) * 2 - low
    if high >= total - window:
        high = total - window
        low = (capacity - window) * 2 - high
    if not (total >= high >= low >= window):
        return [max(1, round(total * (1 - ratio)))] * layers
    steps = (high - low) / (layers - 1) if layers > 1 else 0.0
    return [round(high - layer * steps) for layer in range(layers)]


@register_method
@dataclass
class PyramidKV(SnapKV):
    name = "pyramidkv"

    beta: float = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation == "global":
            raise ValueError("pyramidkv sets per-layer budgets: use uniform or layer allocation")

    def keep_masks(self, scores: list[torch.Tensor], seen: int, budget: Budget) -> list[torch.Tensor]:
        ratio = budget.ratio
        budgets = pyramid_budgets(seen, ratio, self.window_size, self.beta, len(scores))
        return select(scores, seen, budget, per_layer=budgets)
