"""SimLayerKV: lazy layers keep only their initial and recent tokens; the others keep everything.

SimLayerKV (Zhang et al., 2024, arXiv:2410.13846): find the "lazy" layers — those whose last
query puts more than ``threshold`` of its attention on the first ``n_initial`` and the last
``n_recent`` tokens — and keep only those tokens there; other layers keep everything.

kvpress: ``SimLayerKVPress``. Its ``lazy_threshold`` is kvbench's ``threshold`` (so ``--threshold``
sets it); a lazy layer keeps the ``n_initial`` first and the ``n_recent − n_last`` last entries, as
kvpress does. The kept fraction follows from the model, not from a requested ratio, so kvbench runs
it in threshold mode (only a measured ratio). kvpress's default threshold, 1.0, compresses nothing;
kvbench's default is 0.9, kvpress's recommendation for Llama 3 (0.65 Llama 2, 0.8 Mistral, 0.85 Qwen).
"""

from dataclasses import dataclass

import torch

from kvbench.core.attention import attention_rows
from kvbench.core.method import Method, register_method
from kvbench.core.scoring import LayerView


@register_method
@dataclass
class SimLayerKV(Method):
    name = "simlayerkv"

    threshold: float = 0.9
    n_last: int = 1
    n_recent: int = 1024
    n_initial: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"simlayerkv threshold must be in [0, 1], not {self.threshold}")

    def hidden_window(self) -> int:
        return self.n_last

    @torch.no_grad()
    def lazy_mass(self, view: LayerView) -> float:
        """Attention of the last ``n_last`` queries on the initial and recent entries, averaged
        over queries and heads (the ``n_last`` entries themselves left out, as kvpress)."""
        total = view.keys.shape[2]
        probs = attention_rows(view.last_queries(self.n_last), view.keys, view.scaling, total - self.n_last)
        mean = probs[..., : total - self.n_last].mean(dim=(0, 1, 2))
        return float(mean[: self.n_initial].sum() + mean[-self.n_recent :].sum())

    def score(self, view: LayerView) -> torch.Tensor:
        """1 for kept entries, 0 for evicted ones."""
        batch, heads, total, _ = view.keys.shape
        scores = torch.ones(batch, heads, total, device=view.keys.device)
        short = total <= self.n_initial + self.n_recent + self.n_last
        if self.threshold == 1.0 or short or self.lazy_mass(view) <= self.threshold:
            return scores
        scores[:, :, self.n_initial : total - (self.n_recent - self.n_last)] = 0.0
        return scores

    def keep_mask(self, scores: torch.Tensor) -> torch.Tensor:
        return scores > 0.5
