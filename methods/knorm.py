"""Knorm: keep the keys with the smallest L2 norm (they draw the most attention).

Knorm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression"): keys with a small L2 norm draw the most attention, so the lowest norms are kept.

kvpress: ``KnormPress`` (score ``-‖k‖₂``, accumulated in at least float32 so low-precision caches
do not tie distinct positions).
"""

from dataclasses import dataclass

import torch

from kvbench.core.method import Method, register_method
from kvbench.core.scoring import LayerView


@register_method
@dataclass
class Knorm(Method):
    name = "knorm"
    incremental = True  # a key's norm never changes: any new entry can be scored on arrival

    def score(self, view: LayerView) -> torch.Tensor:
        dtype = torch.promote_types(view.keys.dtype, torch.float32)
        return -torch.linalg.vector_norm(view.keys, dim=-1, dtype=dtype)
