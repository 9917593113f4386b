"""CurDKV: keep the entries with the largest approximate key × value leverage.

CurDKV ("Value-Guided KV Compression for LLMs via Approximated CUR Decomposition",
arXiv:2509.15038): keep the entries with the largest approximate leverage, the product of each key's
and value's squared norm normalised within local windows of 16 entries.

kvpress: ``CURPress`` (defaults: ``kv_product``, local approximation over 16 entries, 4 sinks scored
1). The optional random projection draws from a generator seeded by (``seed``, layer), where
kvpress draws from torch's global generator.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.core.method import Method, register_method
from kvbench.core.scoring import LayerView

LEVERAGE_TYPES = ("key", "value", "kv_avg", "kv_product")


@register_method
@dataclass
class CUR(Method):
    name = "cur"

    num_sinks: int = 4
    leverage_type: str = "kv_product"
    use_random_leverage: bool = False
    use_local_approximation: bool = True
    local_window_size: int = 16

    def __post_init__(self) -> None:
        if self.leverage_type not in LEVERAGE_TYPES:
            raise ValueError(f"cur leverage_type must be one of {', '.join(LEVERAGE_TYPES)}, not {self.leverage_type!r}")

    def score(self, view: LayerView) -> torch.Tensor:
        keys, values = view.keys, view.values
        if self.use_random_leverage:  # a 20-dimensional Gaussian sketch, as kvpress
            generator = torch.Generator().manual_seed(self.seed + view.layer_idx)
            sketch = torch.randn(keys.shape[-1], 20, generator=generator, dtype=keys.dtype) / 20**0.5
            keys, values = keys @ sketch.to(keys.device), values @ sketch.to(keys.device)
        k2, v2 = (keys**2).sum(dim=-1), (values**2).sum(dim=-1)
        if self.use_local_approximation:
            k2, v2 = self._local(k2), self._local(v2)
        scores = {"key": k2, "value": v2, "kv_avg": (k2 + v2) / 2, "kv_product": k2 * v2}[self.leverage_type]
        scores = scores / scores.sum(dim=-1, keepdim=True)
        scores[:, :, : self.num_sinks] = 1.0
        return scores

    def _local(self, norms: torch.Tensor) -> torch.Tensor:
        """Normalise within consecutive windows (the last one zero-padded)."""
        batch, heads, total = norms.shape
        w = self.local_window_size
        blocks = F.pad(norms, (0, (w - total % w) % w)).reshape(batch, heads, -1, w)
        return (blocks / blocks.sum(dim=-1, keepdim=True)).reshape(batch, heads, -1)[:, :, :total]
