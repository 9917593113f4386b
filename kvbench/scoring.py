"""What a method sees when it scores a layer, and the recorder that collects it during prefill."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kvbench.attention import project_queries


@dataclass
class LayerView:
    """One layer's cache plus the attention inputs of the last ``hidden.shape[1]`` tokens fed.

    ``hidden`` is the attention input (after the layer's input norm, before the projections), as
    Fast KVzip and KVzap read it; ``cos``/``sin`` are the rotary tables at those tokens' positions.
    For incremental methods (scoring during chunked prefill or decoding) these are exactly the
    tokens fed since the method last scored; their entries are the last slots of every head.
    ``valid`` marks real slots of a padded layout (None: all real); ``state`` is the layer's
    per-entry method state, gathered and rolled back with the cache (see ``kvbench.cache``).
    ``ratio`` is set only for a method whose ``ratio_dependent()`` is true; ``rotary`` builds rotary
    tables at positions not yet seen (Expected Attention averages RoPE over future positions).
    """

    layer_idx: int
    attn: nn.Module
    keys: torch.Tensor  # (B, Hkv, T, D), post-RoPE as cached
    values: torch.Tensor  # (B, Hkv, T, D)
    hidden: torch.Tensor  # (B, n, d): attention inputs of the last n context tokens
    cos: torch.Tensor  # (B, n, D)
    sin: torch.Tensor  # (B, n, D)
    valid: torch.Tensor | None = None  # (B, Hkv, T) bool
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    ratio: float | None = None  # the target ratio, only for methods whose scores depend on it
    rotary: nn.Module | None = None  # the model's rotary embedding: ``rotary(x, position_ids) -> cos, sin``

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def scaling(self) -> float:
        return self.attn.scaling

    def last_queries(self, n: int) -> torch.Tensor:
        """Post-RoPE queries ``(B, Hq, n, D)`` of the last ``n`` context tokens, rebuilt."""
        if n > self.hidden.shape[1]:
            raise ValueError(f"only the last {self.hidden.shape[1]} attention inputs were recorded, not {n}")
        return project_queries(self.attn, self.hidden[:, -n:], self.cos[:, -n:], self.sin[:, -n:])


class HiddenRecorder:
    """Records each layer's attention inputs and rotary tables while the context is prefilled.

    A forward pre-hook on every attention module keeps the last ``keep`` rows (``None``: all rows),
    so a method that reads only a window of queries costs a window of memory, not the context.
    """

    def __init__(self, attention_modules: list[nn.Module], keep: int | None):
        self.keep = keep
        self.hidden: list[torch.Tensor | None] = [None] * len(attention_modules)
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self._handles = [
            module.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, module in enumerate(attention_modules)
        ]

    def _tail(self, old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        joined = new if old is None else torch.cat([old, new], dim=1)
        return joined if self.keep is None else joined[:, -self.keep :]

    def _hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            if self.keep == 0:
                return
            self.hidden[layer_idx] = self._tail(self.hidden[layer_idx], kwargs["hidden_states"].detach())
            if layer_idx == 0:
                cos, sin = kwargs["position_embeddings"]
                self.cos, self.sin = self._tail(self.cos, cos), self._tail(self.sin, sin)

        return hook

    def reset(self) -> None:
        """Forget what was recorded (after an incremental method has scored it)."""
        self.hidden = [None] * len(self.hidden)
        self.cos = self.sin = None

    @property
    def nbytes(self) -> int:
        return self.nbytes_of_last(None)

    def nbytes_of_last(self, rows: int | None) -> int:
        """Bytes of the last ``rows`` recorded rows (None: all): what a method reading only those
        would have had recorded, when one recorder served several."""
        if rows == 0:
            return 0
        tensors = [t if rows is None else t[:, -rows:] for t in [*self.hidden, self.cos, self.sin] if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> "HiddenRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
