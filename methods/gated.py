"""Fast KVzip (Kim, Han and Yun, 2026): a small learned gate per layer predicts KVzip's score.

Each layer's gate reads a token's attention input (after the input norm, before RoPE) and scores the
token's KV entry against 16 learned sink keys per KV head (``kvbench.weights.SinkGate``): the score
depends on the token alone, so new chunks and decoded tokens are scored as they arrive, with no extra
forward pass. Gates are trained on KVzip's scores (``kvbench train gated``); the default model's ship
with kvbench. Defaults follow the reference: one global threshold over all layers and heads, the 4
sinks and a recent window (2% of the context, 4,096 tokens past 32K) kept, and during decoding new
tokens buffered and scored every 128.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods import Method, register_method
from kvbench.scoring import LayerView

STATE = "gated"  # per-entry gate scores kept in the cache layer's state


@register_method
@dataclass
class Gated(Method):
    name = "gated"
    incremental = True

    weights: str | None = None  # gate file or folder; None: shipped, trained or published gates
    allocation: str = "global"
    window_ratio: float = 0.02  # recent window for contexts under `long_context` tokens
    window_size: int = 4096  # recent window beyond that
    long_context: int = 32000
    interval: int = 128  # decoding: re-score after this many new tokens

    def __post_init__(self) -> None:
        self._gates = None

    def hidden_window(self) -> None:
        return None  # every token's own attention input

    def protected_recent(self, total: int, budget: int = 0) -> int:
        return int(total * self.window_ratio) if total < self.long_context else min(self.window_size, total)

    def setup(self, model, tokenizer=None) -> None:
        """Load the gates once the model is known: missing weights fail before any sample runs."""
        self.gates(model.config)

    def gates(self, config):
        if self._gates is None:
            from kvbench.weights import load_gates

            self._gates = load_gates(config, self.weights)
        return self._gates

    def score(self, view: LayerView) -> torch.Tensor:
        gate = self.gates(view.attn.config)[view.layer_idx]
        if gate.q_proj.weight.dtype != view.hidden.dtype or gate.q_proj.weight.device != view.hidden.device:
            # projections in the model's dtype, as the reference runs them (norms and softmax stay fp32)
            gate.to(view.hidden.device, view.hidden.dtype)
        return token_scores(view, STATE, gate(view.hidden))


def token_scores(view: LayerView, key: str, new: torch.Tensor) -> torch.Tensor:
    """Scores of every slot when each token's score depends on that token alone (gates, surrogates).

    ``new`` scores the tokens fed since the last call (the last slots); the older slots' scores are
    kept in the layer's ``state`` (fp16, gathered and rolled back with the cache), so chunked prefill
    and decoding score each token once. A call covering every slot starts afresh.
    """
    new = new.half().float()  # as stored, so a fresh and an incremental scoring agree exactly
    slots, fresh = view.keys.shape[2], new.shape[-1]
    old = view.state.get(key)
    if old is not None and old.shape[-1] == slots - fresh:
        scores = torch.cat([old.float(), new], dim=-1)
    elif fresh == slots:
        scores = new
    else:
        held = 0 if old is None else old.shape[-1]
        raise ValueError(f"{key}: {fresh} new tokens for {slots} slots, but scores held for {held}")
    view.state[key] = scores.half()
    return scores
