"""Non-causal chunked attention: attention received within bidirectional chunks, times ‖v‖.

Non-causal chunked attention (the attention half of Compactor, Chari and Van Durme, 2025,
arXiv:2507.08143): within chunks of ``chunk_size`` tokens every query attends to every key of its
chunk, in both directions; a key's score is the attention its chunk's queries pay it, averaged over
the GQA group, times ``‖v‖``, smoothed over 3 neighbours and z-scored over the layer.

kvpress: ``NonCausalAttnPress``. As there, the logits are plain dot products (no 1/√d scaling) and
a ragged last chunk is zero-padded, its padded queries and keys given logit 0 and -1e-9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.core.attention import apply_rope, prerope_queries
from kvbench.core.method import Method, register_method
from kvbench.methods.leverage import z_score
from kvbench.core.scoring import LayerView


def chunked_attention_received(queries: torch.Tensor, keys: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(B, H, S)``: per key, the softmax attention summed over the queries of its chunk."""
    batch, heads, total, dim = keys.shape
    padded = math.ceil(total / chunk) * chunk
    q = F.pad(queries, (0, 0, 0, padded - total)).view(batch, heads, -1, chunk, dim)
    k = F.pad(keys, (0, 0, 0, padded - total)).view(batch, heads, -1, chunk, dim)
    last = padded - chunk
    outside = (torch.arange(last, padded, device=keys.device) >= total).view(1, 1, chunk)
    dots = torch.matmul(q, k.transpose(-2, -1))
    dots[:, :, -1].masked_fill_(outside.unsqueeze(-1), 0)
    dots[:, :, -1].masked_fill_(outside.unsqueeze(-2), -1e-9)
    return dots.float().softmax(dim=-1).sum(dim=-2).view(batch, heads, padded)[..., :total]


def non_causal_scores(view: LayerView, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, chunk: int) -> torch.Tensor:
    """Scores of ``keys``/``values`` (a contiguous span) from the attention inputs of the same span."""
    queries = apply_rope(prerope_queries(view.attn, hidden), cos, sin)
    group = queries.shape[1] // keys.shape[1]
    received = chunked_attention_received(queries, keys.repeat_interleave(group, dim=1), chunk)
    received = received.view(received.shape[0], keys.shape[1], group, -1).mean(dim=-2)
    scores = F.avg_pool1d(received * values.norm(dim=-1), kernel_size=3, padding=1, stride=1)
    return z_score(scores)


@register_method
@dataclass
class NonCausalAttention(Method):
    name = "non_causal_attention"

    chunk_size: int = 256

    def hidden_window(self) -> None:
        return None

    def score(self, view: LayerView) -> torch.Tensor:
        if view.hidden.shape[1] != view.keys.shape[2]:
            raise ValueError("non_causal_attention scores a whole prefilled context (one query per entry)")
        return non_causal_scores(view, view.hidden, view.keys, view.values, view.cos, view.sin, self.chunk_size)
