"""H2O (Zhang et al., 2023): keep the heavy hitters — entries that received the most attention —
and the most recent tokens, the budget split half and half as in the paper's reference setting.

Each entry's score is the attention it has received, summed over every query that saw it, as the
paper and its reference code (``H2OKVCache_LayerWise``) accumulate it, averaged over the GQA group.
``normalize=True`` divides each sum by how many queries could see the entry (during prefill an early
token is seen by many more queries than a late one): kvpress's ``ObservedAttentionPress``. The sums
live in the cache's state, so every new query — chunks of a prefill, the question, generated tokens
— adds its attention row before the next eviction. The paper evicts at every decoding step: that is
``--evict-during-decoding --decode-interval 1`` (a larger interval lets the cache grow by that many
tokens between evictions). Probabilities are computed in blocks of queries from the attention
inputs, never as one T×T matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.core.attention import attention_rows, project_queries, reduce_group
from kvbench.core.method import Method, register_method
from kvbench.core.scoring import LayerView


@register_method
@dataclass
class H2O(Method):
    name = "h2o"
    incremental = True

    recent_fraction: float = 0.5  # share of the budget for the most recent tokens
    query_block: int = 256  # queries per block of attention probabilities
    normalize: bool = False  # divide by the queries that saw each entry (kvpress), not the paper's raw sums

    def __post_init__(self) -> None:
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ValueError(f"h2o recent_fraction must be in [0, 1], not {self.recent_fraction}")

    def hidden_window(self) -> None:
        return None  # every query's attention row counts

    def protected_recent(self, seen: int, budget: int, decoding: bool = False) -> int:
        return int(budget * self.recent_fraction)

    def score(self, view: LayerView) -> torch.Tensor:
        batch, kv_heads, total, _ = view.keys.shape
        new = view.hidden.shape[1]
        sums = self._extended(view, "sum", total)
        first = total - new  # cache index of the first new query
        for start in range(0, new, self.query_block):
            stop = min(start + self.query_block, new)
            queries = project_queries(view.attn, view.hidden[:, start:stop], view.cos[:, start:stop],
                                      view.sin[:, start:stop])
            probs = attention_rows(queries, view.keys, view.scaling, first + start, view.valid)
            sums += reduce_group(probs.sum(dim=2), kv_heads, "mean")
        if not self.normalize:
            return sums.clone()
        counts = self._extended(view, "count", total)
        # key j is seen by the new queries at indices >= j: all `new` of them, or fewer if j is new
        seen_by = (total - torch.arange(total, device=view.keys.device)).clamp(max=new).float()
        counts += seen_by if view.valid is None else seen_by * view.valid
        return sums / counts.clamp(min=1.0)

    @staticmethod
    def _extended(view: LayerView, key: str, total: int) -> torch.Tensor:
        """The running ``key`` (sums or counts), extended with zeros for entries added since last time."""
        batch, kv_heads = view.keys.shape[:2]
        old = view.state.get(key)
        have = 0 if old is None else old.shape[-1]
        zeros = torch.zeros(batch, kv_heads, total - have, device=view.keys.device)
        view.state[key] = zeros if old is None else torch.cat([old, zeros], dim=-1)
        return view.state[key]
