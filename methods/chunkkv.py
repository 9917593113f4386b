"""ChunkKV: keep whole chunks of tokens, the same in every head, ranked by a base method.

ChunkKV (Liu et al., 2025, "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient
Long-Context LLM Inference", arXiv:2502.00299): keep whole chunks of ``chunk_length`` tokens, the
same chunks in every head, ranked by the base method's scores summed over heads and averaged over
the chunk.

kvpress: ``ChunkKVPress(press, chunk_length=20)``: it keeps ``max(1, int(chunks · (1 − ratio)))``
chunks (a ragged last chunk counts as one), so the kept count follows the chunks, not the exact
budget; a context shorter than one chunk falls back to the base's top-k. In kvbench protected
entries (sinks, the base's window) score +inf, so their chunks rank first and are always kept.
"""

from dataclasses import dataclass

import torch

from kvbench.core.budget import Budget
from kvbench.core.method import Wrapper, register_method


def chunk_keep_mask(scores: torch.Tensor, chunk_length: int, ratio: float) -> torch.Tensor:
    """``(B, H, T)`` mask of the best chunks of batch element 0, shared by every head."""
    total = scores.shape[-1]
    complete = total // chunk_length
    summed = scores.sum(dim=1)  # (B, T)
    chunk_scores = summed[:, : complete * chunk_length].view(-1, complete, chunk_length).mean(dim=-1)
    if total % chunk_length:
        chunk_scores = torch.cat([chunk_scores, summed[:, complete * chunk_length :].mean(dim=-1, keepdim=True)], -1)
    n_chunks = chunk_scores.shape[-1]
    kept_chunks = max(1, int(n_chunks * (1 - ratio)))
    chosen = chunk_scores.topk(kept_chunks, dim=-1).indices[0]
    chunk_of = torch.arange(total, device=scores.device) // chunk_length
    keep = torch.isin(chunk_of, chosen)
    return keep.view(1, 1, total).expand_as(scores).clone()


@register_method
@dataclass
class ChunkKV(Wrapper):
    name = "chunkkv"

    chunk_length: int = 20

    def keep_masks(self, scores: list[torch.Tensor], seen: int, budget: Budget) -> list[torch.Tensor]:
        ratio = budget.ratio
        if any(s.shape[-1] < self.chunk_length for s in scores):
            return self.base.keep_masks(scores, seen, budget)
        return [chunk_keep_mask(s, self.chunk_length, ratio) for s in scores]
