"""CriticalAdaKV: CriticalKV's two stages inside AdaKV's head-adaptive budgets.

CriticalAdaKV (Feng et al., 2025, arXiv:2502.03805): CriticalKV's two stages inside AdaKV's
head-adaptive budgets. Each head's budget is its share of the layer's best ``H · kept`` base
scores (after AdaKV's ``alpha_safeguard`` floor); within it, the head keeps its best
``first_stage_ratio`` by the base score outright and fills the rest by base × ``‖v W_o‖₁``.

kvpress: ``CriticalAdaKVPress(press, alpha_safeguard=0.2, epsilon=1e-4, first_stage_ratio=0.5)``.
The budgets depend on the ratio, so it is scored once per ratio; its scores mark each head's kept
entries with the largest float, as kvpress's do, and the layer allocation keeps exactly those.
"""

from dataclasses import dataclass

import torch

from kvbench.core.method import Wrapper, register_method
from kvbench.methods.criticalkv import output_l1_norms
from kvbench.core.scoring import LayerView


def mark_top(scores: torch.Tensor, counts: list[int], value: float) -> torch.Tensor:
    """Set each head's ``counts[h]`` best scores to ``value``."""
    top = torch.topk(scores, max(counts), sorted=True, dim=-1).indices
    for head, count in enumerate(counts):
        scores[:, head].scatter_(-1, top[:, head, :count], value)
    return scores


@register_method
@dataclass
class CriticalAdaKV(Wrapper):
    name = "criticaladakv"

    allocation: str = "layer"
    alpha_safeguard: float = 0.20
    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def ratio_dependent(self) -> bool:
        return True

    def score(self, view: LayerView) -> torch.Tensor:
        if view.ratio is None:
            raise ValueError("criticaladakv needs the target ratio to size its head budgets")
        scores = self.base.score(view).float().clone()
        batch, heads, total = scores.shape
        largest = torch.finfo(scores.dtype).max
        kept = max(1, int(total * (1 - view.ratio)))  # kvpress's count, floored
        safe = int(kept * self.alpha_safeguard)
        if self.alpha_safeguard > 0:
            safe = max(1, safe)
        mark_top(scores, [safe] * heads, largest)
        best = torch.topk(scores.reshape(batch, -1), kept * heads, dim=-1).indices // total
        budgets = torch.bincount(best.flatten(), minlength=heads)
        mark_top(scores, (budgets * self.first_stage_ratio).long().tolist(), largest)
        scores = (scores + self.epsilon) * output_l1_norms(view.values, view.attn).float()
        return mark_top(scores, budgets.tolist(), largest)
