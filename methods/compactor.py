"""Compactor: leverage of pre-RoPE keys blended with non-causal chunked attention.

Compactor (Chari and Van Durme, 2025, "Compactor: Calibrated Query-Agnostic KV Cache Compression
with Approximate Leverage Scores", arXiv:2507.08143): blend the leverage of pre-RoPE keys with
non-causal chunked attention, ``blending · leverage + attention`` (both z-scored), outside 8 leading
and 4 trailing tokens that are always kept.

kvpress: ``CompactorPress``. Its default blend weight is the compression ratio itself
(``blending=None``); kvbench does the same by scoring once per ratio. The leverage sketch is seeded
by ``seed + layer`` (see ``leverage``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.core.attention import prerope_keys
from kvbench.core.method import Method, register_method
from kvbench.methods.leverage import leverage_scores, z_score
from kvbench.methods.non_causal_attention import non_causal_scores
from kvbench.core.scoring import LayerView


@register_method
@dataclass
class Compactor(Method):
    name = "compactor"

    sink_size_start: int = 8
    sink_size_end: int = 4
    chunk_size: int = 256
    sketch_dimension: int = 48
    blending: float | None = None  # None: the compression ratio (kvpress's heuristic)

    def hidden_window(self) -> None:
        return None

    def ratio_dependent(self) -> bool:
        return self.blending is None

    def score(self, view: LayerView) -> torch.Tensor:
        total = view.keys.shape[2]
        if view.hidden.shape[1] != total:
            raise ValueError("compactor scores a whole prefilled context (one attention input per entry)")
        left = min(self.sink_size_start, total)
        right = min(self.sink_size_end, max(0, total - left))
        span = slice(left, total - right)
        hidden = view.hidden[:, span]
        keys, values = view.keys[:, :, span], view.values[:, :, span]
        generator = torch.Generator().manual_seed(self.seed + view.layer_idx)
        leverage = z_score(leverage_scores(prerope_keys(view.attn, hidden), self.sketch_dimension, generator))
        attention = non_causal_scores(view, hidden, keys, values, view.cos[:, span], view.sin[:, span],
                                      self.chunk_size)
        blending = self.blending if self.blending is not None else view.ratio
        if blending is None:
            blending = 0.35  # kvpress's fallback when no ratio is known
        scores = blending * leverage + attention
        return F.pad(scores, (left, right), value=float(scores.max()))
