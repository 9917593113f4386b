"""LagKV: score entries by their spread against the next partition of tokens.

LagKV ("Lag-Relative Information of the KV Cache Tells Which Tokens Are Important",
arXiv:2504.04704): score each entry against the *next* partition of
``lag_size`` tokens: keys and values are min-max normalised by the following partition's range, and
an entry's score is the softmax (within its partition) of the spread of its normalised channels,
keys and values averaged. Sinks and the last one-to-two partitions (no successor to compare with)
always score 1.

kvpress: ``LagKVPress`` (defaults: 4 sinks, ``lag_size`` 128, ranks within a partition unless
``cross_scoring``; a context shorter than ``n_sink + 2·lag_size`` gets recency scores).
"""

from dataclasses import dataclass

import torch

from kvbench.core.method import Method, register_method
from kvbench.core.scoring import LayerView


@register_method
@dataclass
class LagKV(Method):
    name = "lagkv"

    n_sink: int = 4
    lag_size: int = 128
    cross_scoring: bool = False

    def score(self, view: LayerView) -> torch.Tensor:
        keys, values = view.keys, view.values
        batch, heads, total, dim = keys.shape
        if total < self.n_sink + 2 * self.lag_size:  # too short: keep the sinks, then by recency
            scores = torch.ones(batch, heads, total, dtype=keys.dtype, device=keys.device)
            if total > self.n_sink:
                rest = total - self.n_sink
                scores[:, :, self.n_sink :] = (torch.arange(rest, device=keys.device) / rest).to(keys.dtype)
            return scores
        end = self.n_sink + ((total - self.n_sink) // self.lag_size) * self.lag_size
        tail = self.lag_size + total - end

        def partitions(x: torch.Tensor) -> torch.Tensor:
            return x[:, :, self.n_sink : end].view(batch, heads, -1, self.lag_size, dim)

        scores = (self._spread(partitions(keys)) + self._spread(partitions(values))) / 2
        if not self.cross_scoring:
            scores = (scores.argsort(dim=-1).argsort(dim=-1) / self.lag_size).to(keys.dtype)
        ones = scores.new_ones
        return torch.cat([ones(batch, heads, self.n_sink), scores.reshape(batch, heads, -1),
                          ones(batch, heads, tail)], dim=-1)

    def _spread(self, parts: torch.Tensor) -> torch.Tensor:
        """``(B, H, P, lag, D)`` → per entry of the first ``P - 1`` partitions, in [0, 1]."""
        reference, states = parts[:, :, 1:], parts[:, :, :-1]
        low = reference.min(dim=-2).values.unsqueeze(-2)
        high = reference.max(dim=-2).values.unsqueeze(-2)
        return ((states - low) / (high - low)).std(dim=-1).softmax(dim=-1)
