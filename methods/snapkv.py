"""SnapKV (Li et al., 2024): entries the last window of queries attends to are the ones to keep.

Defaults follow the reference code: a 64-query observation window, 1-D average pooling with kernel 5
(LongBench configs use 7 with max pooling: ``pooling="max"``), scores averaged over the window's
queries and over each GQA group, and the window itself always kept (inside the budget).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.core.attention import attention_rows, reduce_group
from kvbench.core.method import Method, register_method
from kvbench.core.scoring import LayerView


@register_method
@dataclass
class SnapKV(Method):
    name = "snapkv"

    window_size: int = 64
    kernel_size: int = 5
    pooling: str = "avg"

    def __post_init__(self) -> None:
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"snapkv pooling must be 'avg' or 'max', not {self.pooling!r}")
        if self.kernel_size % 2 == 0:
            raise ValueError("snapkv kernel_size must be odd so pooling keeps positions aligned")

    def hidden_window(self) -> int:
        return self.window_size

    def protected_recent(self, seen: int, budget: int, decoding: bool = False) -> int:
        return min(self.window_size, seen)

    def score(self, view: LayerView) -> torch.Tensor:
        total = view.keys.shape[2]
        if total <= self.window_size:  # kvpress asserts the same: nothing outside the window votes
            raise ValueError(f"{self.name}'s observation window ({self.window_size} tokens) covers the whole "
                             f"context ({total}): nothing is left to score; use a smaller window_size")
        window = self.window_size
        queries = view.last_queries(window)
        probs = attention_rows(queries, view.keys, view.scaling, first_query_index=total - window)
        votes = probs[..., : total - window].mean(dim=2)  # (B, Hq, T - window)
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        votes = pool(votes, self.kernel_size, stride=1, padding=self.kernel_size // 2)
        scores = reduce_group(votes, view.num_kv_heads, "mean")
        # the window keeps itself (the engine protects it); `max + 1` as kvpress, so wrappers that
        # rank scores before protection (CriticalKV, ChunkKV) see what kvpress's see
        return F.pad(scores, (0, window), value=float(scores.max()) + 1 if scores.numel() else 0.0)
