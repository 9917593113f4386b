"""TOVA: keep the entries the most recent query attends to (mean over all query heads).

TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): keep the entries the most recent
query attends to, its attention averaged over all query heads (one ranking shared by every KV head,
as in TOVA's official cache).

kvpress: ``TOVAPress``. The most recent entry is always kept (kvpress pads it with ``max + 1``;
kvbench protects it). TOVA evicts as it decodes, so kvbench lets it evict during chunked prefill and
decoding, each time ranking by the newest query.
"""

from dataclasses import dataclass

import torch

from kvbench.core.attention import attention_rows
from kvbench.core.method import Method, register_method
from kvbench.core.scoring import LayerView


@register_method
@dataclass
class TOVA(Method):
    name = "tova"
    incremental = True

    def hidden_window(self) -> int:
        return 1

    def protected_recent(self, seen: int, budget: int, decoding: bool = False) -> int:
        return min(1, seen)

    def score(self, view: LayerView) -> torch.Tensor:
        batch, kv_heads, total, _ = view.keys.shape
        probs = attention_rows(view.last_queries(1), view.keys, view.scaling, total - 1, view.valid)
        shared = probs[:, :, 0, :-1].mean(dim=1, keepdim=True).expand(batch, kv_heads, total - 1)
        return torch.cat([shared, shared.new_full((batch, kv_heads, 1), float(shared.max()) + 1)], dim=-1)
