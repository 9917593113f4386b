"""CriticalKV: a base method's best half of the budget, the rest by its score × ‖v W_o‖₁.

CriticalKV (Feng et al., 2025, "Identify Critical KV Cache in LLM Inference from an Output
Perturbation Perspective", arXiv:2502.03805): two stages. First the base method's best
``first_stage_ratio`` of the budget is kept outright; the rest is ranked by the base score times the
L1 norm of each value's contribution to the output, ``‖v W_o‖₁`` (averaged over the GQA group).

kvpress: ``CriticalKVPress(press, epsilon=1e-4, first_stage_ratio=0.5)``. Stage one's size depends
on the budget, so kvbench scores it once per ratio (``ratio_dependent``); like kvpress it sizes stage
one as ``int((1 − ratio) · T · first_stage_ratio)`` (at least 1).
"""

from dataclasses import dataclass

import torch

from kvbench.core.method import Wrapper, register_method
from kvbench.core.scoring import LayerView


def output_l1_norms(values: torch.Tensor, attn) -> torch.Tensor:
    """``‖v W_o‖₁`` per entry ``(B, Hkv, T)``: each query head's slice of ``o_proj`` applied to the
    values it reads, averaged over the GQA group (head by head, as kvpress, to bound memory)."""
    batch, kv_heads, total, dim = values.shape
    q_heads = attn.config.num_attention_heads
    group = q_heads // kv_heads
    w_o = attn.o_proj.weight.transpose(0, 1).view(q_heads, dim, -1)
    norms = [torch.norm(values[:, head // group] @ w_o[head].unsqueeze(0), p=1, dim=-1) for head in range(q_heads)]
    return torch.stack(norms, dim=1).view(batch, kv_heads, group, total).mean(dim=2)


@register_method
@dataclass
class CriticalKV(Wrapper):
    name = "criticalkv"

    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def ratio_dependent(self) -> bool:
        return True

    def score(self, view: LayerView) -> torch.Tensor:
        if view.ratio is None:
            raise ValueError("criticalkv needs the target ratio to size its first stage")
        scores = self.base.score(view).float()
        total = view.keys.shape[2]
        first = int((1 - view.ratio) * total * self.first_stage_ratio)
        if self.first_stage_ratio > 0:
            first = max(1, first) if view.ratio < 1.0 else 0
        stage_one = torch.topk(scores, first, sorted=True, dim=-1).indices
        scores = (scores + self.epsilon) * output_l1_norms(view.values, view.attn).float()
        return scores.scatter(-1, stage_one, torch.finfo(scores.dtype).max)
