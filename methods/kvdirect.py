"""KV-Direct (Qasim et al., 2026): residual-stream checkpoints instead of K/V, recomputed exactly.

A live window of the newest tokens keeps its keys and values; every older token keeps only its
per-layer residual (the layer input before the input norm), from which attention recomputes its
K/V (``kvbench.residual``). ``ratio`` is the fraction of context tokens whose K/V lives only as a
residual. Nothing is lost, so the answers match the full cache's; what it costs is the recompute
time, and on GQA models memory: a per-layer residual is often larger than the K/V it replaces.

The paper's memory figure (5 KB against 136 KB per token on Gemma-3-4B) is one residual per token
for the whole model; rebuilding every layer's K/V from that means running all layers over the
checkpointed tokens again. Per-layer residuals, as here, need only the k/v projections.
"""

from dataclasses import dataclass

from kvbench.budget import kept_count
from kvbench.methods import Method, register_method
from kvbench.residual import ResidualCache


@register_method
@dataclass
class KVDirect(Method):
    """No sinks (nothing is evicted, so none need protecting); one window for every layer and head."""

    name = "kvdirect"
    manages_cache = True

    sinks: int = 0

    def __post_init__(self):
        if self.allocation != "uniform":
            raise ValueError(f"kvdirect keeps one live window for every layer and head: allocation "
                             f"{self.allocation!r} does not apply (use uniform)")

    def new_cache(self, model, context_tokens: int, ratio: float) -> ResidualCache:
        return ResidualCache(model, window=kept_count(context_tokens, ratio))
