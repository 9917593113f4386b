"""KVzap (Jegou et al., 2026): a per-layer surrogate predicts log KVzip+ from a token's attention input.

The surrogate (linear, or D→512→GELU→H_kv) maps each token's attention input to H_kv predicted log
KVzip+ scores, so tokens are scored as they arrive, in prefill and in decoding. The reference evicts
by threshold: an entry older than the 128-token sliding window goes when its predicted score is below
τ (the reference README uses τ = -4), and the compression ratio is measured, not chosen. Leaving
``threshold`` unset gives the fixed-ratio mode (the best entries under a global budget) so KVzap sits
in ratio sweeps. Surrogates are trained with ``kvbench train kvzap``; the default model's ship with
kvbench.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods import Method, register_method
from kvbench.methods.gated import token_scores
from kvbench.scoring import LayerView

STATE = "kvzap"


@register_method
@dataclass
class KVzap(Method):
    name = "kvzap"
    incremental = True

    kind: str = "mlp"  # the reference's default surrogate
    threshold: float | None = None  # τ: evict predicted log KVzip+ below it (None: fixed ratio)
    window_size: int = 128  # the sliding window never evicted
    weights: str | None = None  # surrogate folder; None: shipped, trained or published
    allocation: str = "global"
    interval: int = 128  # decoding: score new tokens after this many

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"kvzap kind must be 'linear' or 'mlp', not {self.kind!r}")
        self._surrogate = None

    def hidden_window(self) -> None:
        return None

    def protected_recent(self, total: int, budget: int = 0) -> int:
        return min(self.window_size, total)

    def setup(self, model, tokenizer=None) -> None:
        """Load the surrogate once the model is known: missing weights fail before any sample runs."""
        self.surrogate(model.config)

    def surrogate(self, config):
        if self._surrogate is None:
            from kvbench.weights import load_surrogate

            self._surrogate = load_surrogate(config, self.kind, self.weights)
        return self._surrogate

    def score(self, view: LayerView) -> torch.Tensor:
        model = self.surrogate(view.attn.config).to(view.hidden.device)
        return token_scores(view, STATE, model.layer(view.layer_idx, view.hidden))

    def keep_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Threshold mode: entries kept (``scores`` already protected: sinks and window at +inf)."""
        return scores >= self.threshold
