"""Leverage scores: keep the keys that stick out of the layer's key geometry.

Leverage scores (Chari and Van Durme, 2025, "Compactor: Calibrated Query-Agnostic KV Cache
Compression with Approximate Leverage Scores", arXiv:2507.08143): keep the keys that stick out of
the layer's key geometry — the statistical leverage of each centred pre-RoPE key, approximated with
a right Gaussian sketch of ``sketch_dimension`` columns and a Cholesky solve, z-scored over the layer.

kvpress: ``LeverageScorePress``. The sketch is drawn from a CPU generator seeded by
``seed + layer`` (kvpress draws from torch's global generator, so its fixture seeds that instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.core.attention import prerope_keys
from kvbench.core.method import Method, register_method
from kvbench.core.scoring import LayerView


def cholesky_with_jitter(gram: torch.Tensor, jitter: float = 1e-2, tries: int = 5) -> torch.Tensor:
    """Lower Cholesky factor, adding a growing multiple of the identity until it succeeds (a sketch
    wider than the head dimension makes the Gram matrix singular)."""
    identity = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    current = float(jitter)
    for _ in range(tries):
        factor, info = torch.linalg.cholesky_ex(gram + current * identity, upper=False)
        if bool((info == 0).all()):
            return factor
        current = max(1e-8, 1e-2 if current == 0.0 else 10.0 * current)
    raise RuntimeError(f"Cholesky failed after {tries} tries")


def leverage_scores(keys: torch.Tensor, sketch_dimension: int, generator: torch.Generator) -> torch.Tensor:
    """Approximate ``diag(X (XᵀX)⁻¹ Xᵀ)`` of sequence-centred, sketched keys ``(B, H, S, D)`` → ``(B, H, S)``."""
    batch, heads, _, dim = keys.shape
    sketch = torch.randn(batch, heads, dim, sketch_dimension, generator=generator, dtype=keys.dtype)
    sketch = sketch.to(keys.device) * (1 / math.sqrt(sketch_dimension))
    x = torch.matmul(keys - keys.mean(dim=-2, keepdim=True), sketch).to(torch.float32)
    xt = x.transpose(-2, -1)
    gram = xt @ x
    factor = cholesky_with_jitter(0.5 * (gram + gram.transpose(-2, -1)))
    solved = torch.cholesky_solve(xt, factor, upper=False)  # (XᵀX)⁻¹ Xᵀ without the inverse
    return (x * solved.transpose(-2, -1)).sum(dim=-1).clamp_min(0)


def z_score(scores: torch.Tensor) -> torch.Tensor:
    """Normalised over the whole layer (all heads at once), as kvpress does."""
    return (scores - scores.mean()) / scores.std().clamp_min(1e-6)


@register_method
@dataclass
class Leverage(Method):
    name = "leverage"

    sketch_dimension: int = 48

    def hidden_window(self) -> None:
        return None  # pre-RoPE keys of every context token

    def score(self, view: LayerView) -> torch.Tensor:
        if view.hidden.shape[1] != view.keys.shape[2]:
            raise ValueError("leverage scores a whole prefilled context (one attention input per entry)")
        generator = torch.Generator().manual_seed(self.seed + view.layer_idx)
        return z_score(leverage_scores(prerope_keys(view.attn, view.hidden), self.sketch_dimension, generator))
