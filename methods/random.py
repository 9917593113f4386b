"""Uniformly random eviction: the floor every method should beat."""

from dataclasses import dataclass

import torch

from kvbench.core.method import Method, register_method
from kvbench.core.scoring import LayerView


@register_method
@dataclass
class Random(Method):
    """Seeded noise per (seed, layer); the only method that may evict the sink tokens and the chat
    template's prefix."""

    name = "random"
    incremental = True
    protects_prefix = False
    sinks: int = 0

    def score(self, view: LayerView) -> torch.Tensor:
        batch, heads, total, _ = view.keys.shape
        # fresh noise at every eviction, reproducible from (seed, layer, cache size)
        generator = torch.Generator().manual_seed((self.seed * 100_003 + view.layer_idx) * 1_000_003 + total)
        return torch.rand(batch, heads, total, generator=generator).to(view.keys.device)
