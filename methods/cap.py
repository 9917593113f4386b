"""CAPKV: keep the entries that add the most capacity to the attention output.

CAPKV (arXiv:2604.25975): keep the entries that add the most "capacity" to the attention output,
``s_i = w_i · v_iᵀ A⁻¹ v_i`` with ``A = I + Σ_j w_j v_j v_jᵀ`` and ``w_i = exp(τ · cos(k_i, μ_q))``,
where ``μ_q`` is the mean pre-RoPE context query rotated by RoPE averaged over the next
``n_future_positions`` positions; averaged over the GQA group.

kvpress: ``CapPress`` (defaults: ``tau`` 5, 512 future positions, the first 4 tokens left out and
scored ``max + 1``, ``epsilon`` 1e-6; keys and the anchor L2-normalised and the weights max-shifted
for stability, values as the output directions).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.core.attention import average_rope, prerope_queries
from kvbench.core.method import Method, register_method
from kvbench.core.scoring import LayerView


@register_method
@dataclass
class CAP(Method):
    name = "cap"

    tau: float = 5.0
    n_future_positions: int = 512
    n_sink: int = 4
    epsilon: float = 1e-6

    def hidden_window(self) -> None:
        return None  # the query anchor averages every context query

    def score(self, view: LayerView) -> torch.Tensor:
        if view.rotary is None:
            raise ValueError("cap needs the model's rotary embedding")
        if view.keys.shape[2] <= self.n_sink:
            raise ValueError(f"cap needs more than n_sink={self.n_sink} entries")
        keys, values = view.keys[:, :, self.n_sink :], view.values[:, :, self.n_sink :]
        batch, kv_heads, n, dim = keys.shape
        queries = prerope_queries(view.attn, view.hidden[:, self.n_sink :])
        group = queries.shape[1] // kv_heads
        rotation = average_rope(view.rotary, queries, view.hidden.shape[1], self.n_future_positions, dim)
        anchor = torch.matmul(queries, rotation.T).mean(dim=2)  # (B, Hq, D)
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        similarity = torch.einsum("bhd,bhtd->bht", F.normalize(anchor, p=2, dim=-1), F.normalize(keys, p=2, dim=-1))
        logits = self.tau * similarity.clamp(-1.0, 1.0)
        weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
        scaled = values * torch.sqrt(weights + self.epsilon).unsqueeze(-1)
        eye = torch.eye(dim, device=values.device, dtype=values.dtype).view(1, 1, dim, dim)
        capacity = (eye + torch.einsum("bhtd,bhte->bhde", scaled, scaled)).float()
        directions = values.transpose(2, 3).float()
        leverage = (directions * torch.linalg.solve(capacity, directions)).sum(dim=2)
        scores = (weights * leverage).view(batch, kv_heads, group, n).mean(dim=2)
        sinks = scores.new_full((batch, kv_heads, self.n_sink), float(scores.max()) + 1)
        return torch.cat([sinks, scores], dim=-1)
