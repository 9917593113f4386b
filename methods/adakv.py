"""AdaKV: the heads of a layer share its budget by one threshold, each keeping a safeguard floor.

AdaKV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation",
arXiv:2407.11550): the heads of a layer share its budget by one threshold over all their scores
(kvbench's ``layer`` allocation), with a safeguard: every head keeps at least its best
``alpha_safeguard`` fraction of the per-head budget.

kvpress: ``AdaKVPress(press, alpha_safeguard=0.2)``. kvpress applies the safeguard to the raw
scores; kvbench applies it after the sinks are protected, so with sinks the safeguarded entries of
a head include its sinks (with ``sinks=0`` the two coincide).
"""

from dataclasses import dataclass

import torch

from kvbench.core.budget import Budget, protect_top, select
from kvbench.core.method import Wrapper, register_method


@register_method
@dataclass
class AdaKV(Wrapper):
    name = "adakv"

    allocation: str = "layer"
    alpha_safeguard: float = 0.20

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha_safeguard <= 1.0:
            raise ValueError(f"adakv alpha_safeguard must be in [0, 1], not {self.alpha_safeguard}")

    def keep_masks(self, scores: list[torch.Tensor], seen: int, budget: Budget) -> list[torch.Tensor]:
        per_head = budget.kept(seen)
        floor = int(per_head * self.alpha_safeguard)
        if self.alpha_safeguard > 0 and per_head > 0:
            floor = max(1, floor)
        return select([protect_top(s, floor) for s in scores], seen, budget)
