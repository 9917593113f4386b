"""KV-Direct: residual-stream checkpoints instead of K/V, with exact K/V recompute on demand.

A live window of the newest tokens keeps its keys and values; every older token keeps only its
per-layer residual (the layer input before the input norm), from which attention recomputes its
K/V (``kvbench.residual``). ``ratio`` is the fraction of context tokens whose K/V lives only as a
residual. Nothing is lost, so the answers match the full cache's; what it costs is the recompute
time, and on GQA models memory: a residual is often larger than the K/V it replaces.
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
