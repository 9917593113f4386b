"""StreamingLLM (Xiao et al., 2023): keep the attention sinks and the most recent tokens."""

from dataclasses import dataclass

import torch

from kvbench.core.method import Method, register_method
from kvbench.core.scoring import LayerView


@register_method
@dataclass
class Window(Method):
    """Score is recency, so the budget left after the 4 sinks goes to the newest entries."""

    name = "window"
    incremental = True

    def score(self, view: LayerView) -> torch.Tensor:
        batch, heads, total, _ = view.keys.shape
        recency = torch.arange(total, device=view.keys.device, dtype=torch.float32)
        return recency.expand(batch, heads, total)
