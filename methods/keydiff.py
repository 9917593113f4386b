"""KeyDiff (Park et al., 2025): keep the keys least similar to the layer's average key direction.

kvpress: ``KeyDiffPress`` (score ``-cos(k, mean of normalised keys)`` per KV head). The paper's
block-wise prefill corresponds to evicting during chunked prefill (``--evict-during-prefill``),
which kvbench does for real rather than simulating it as kvpress's ``BlockPress`` does.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.core.method import Method, register_method
from kvbench.core.scoring import LayerView


@register_method
@dataclass
class KeyDiff(Method):
    name = "keydiff"
    incremental = True

    def score(self, view: LayerView) -> torch.Tensor:
        unit = F.normalize(view.keys, p=2, dim=-1)
        if view.valid is None:
            anchor = unit.mean(dim=2, keepdim=True)
        else:  # padded slots of a non-uniform layout do not count in the anchor
            weight = view.valid.unsqueeze(-1).to(unit.dtype)
            anchor = (unit * weight).sum(dim=2, keepdim=True) / weight.sum(dim=2, keepdim=True).clamp(min=1)
        return -F.cosine_similarity(view.keys, anchor, dim=-1)
