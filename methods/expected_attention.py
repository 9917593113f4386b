"""Expected Attention: the attention that future queries are expected to pay each entry.

Expected Attention ("Expected Attention: KV Cache Compression by Estimating Attention from
Future Queries Distribution", Devoto, Jeblick and Jégou, 2025): score each entry by the attention
future queries are expected to pay it, from the context queries' mean and covariance rotated by
RoPE averaged over the next ``n_future_positions`` positions:
``softmax(k·μ/√d + kᵀΣk/2d)``, averaged over the GQA group, times ``‖v‖`` (plus ``epsilon``).

kvpress: ``ExpectedAttentionPress`` (defaults: 512 future positions, the first 4 tokens left out of
the statistics and scored ``max + 1``, covariance and value-norm rescaling on).
"""

from dataclasses import dataclass

import torch

from kvbench.core.attention import average_rope, prerope_queries
from kvbench.core.method import Method, register_method
from kvbench.core.scoring import LayerView


@register_method
@dataclass
class ExpectedAttention(Method):
    name = "expected_attention"

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def hidden_window(self) -> None:
        return None  # the statistics cover every context query

    def score(self, view: LayerView) -> torch.Tensor:
        if view.rotary is None:
            raise ValueError("expected_attention needs the model's rotary embedding")
        total = view.keys.shape[2]
        if total <= self.n_sink:
            raise ValueError(f"expected_attention needs more than n_sink={self.n_sink} entries")
        mean, cov = self._query_statistics(view)
        keys, values = view.keys[:, :, self.n_sink :], view.values[:, :, self.n_sink :]
        batch, kv_heads, n, dim = keys.shape
        group = mean.shape[1] // kv_heads
        keys = keys.repeat_interleave(group, dim=1).transpose(2, 3)  # (B, Hq, D, n)
        logits = torch.matmul(mean.unsqueeze(2), keys).squeeze(2) / dim**0.5
        if cov is not None:
            logits = logits + torch.einsum("bhin, bhij, bhjn->bhn", keys, cov, keys) / dim / 2
        scores = logits.softmax(dim=-1).view(batch, kv_heads, group, n).mean(dim=2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values.norm(dim=-1)
        sinks = scores.new_full((batch, kv_heads, self.n_sink), float(scores.max()) + 1)
        return torch.cat([sinks, scores], dim=-1)

    def _query_statistics(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean ``(B, Hq, D)`` and covariance ``(B, Hq, D, D)`` of the pre-RoPE context queries
        (sinks excluded: outliers), rotated by the average future RoPE."""
        hidden = view.hidden[:, self.n_sink :]
        queries = prerope_queries(view.attn, hidden)
        mean = queries.mean(dim=2, keepdim=True)
        cov = None
        if self.use_covariance:
            centred = queries - mean
            cov = torch.einsum("bnsi,bnsj->bnij", centred, centred) / hidden.shape[1]
        mean = mean.squeeze(2)
        rotation = average_rope(view.rotary, mean, view.hidden.shape[1], self.n_future_positions, view.attn.head_dim)
        mean = torch.matmul(mean, rotation.T)
        if cov is not None:
            cov = torch.matmul(rotation, torch.matmul(cov, rotation.T))
        return mean, cov
