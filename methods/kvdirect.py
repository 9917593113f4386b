"""KV-Direct (Qasim et al., 2026): residual-stream checkpoints instead of K/V, recomputed exactly.

A live window of the newest tokens keeps its keys and values; every older token keeps only its
per-layer residual (the layer input before the input norm), from which attention recomputes its
K/V (:class:`ResidualCache`). ``ratio`` is the fraction of context tokens whose K/V lives only as a
residual. Nothing is lost, so the answers match the full cache's; what it costs is the recompute
time, and on GQA models memory: a per-layer residual is often larger than the K/V it replaces.

The paper's memory figure (5 KB against 136 KB per token on Gemma-3-4B) is one residual per token
for the whole model; rebuilding every layer's K/V from that means running all layers over the
checkpointed tokens again. Per-layer residuals, as here, need only the k/v projections.

The cache: a layer's key and value for a token are a deterministic function of the layer's input
for that token (the residual stream before the input norm) and the token's position, so the K/V
can be recomputed whenever attention needs them: input norm, k/v projections, Qwen3's k-norm, RoPE
at the token's original position. :class:`ResidualLayer` keeps a live window of the newest
``window`` tokens with their K/V; every older token keeps only its residual. Each forward appends
the new tokens to the window and then moves the oldest ones beyond ``window`` out of it, so the
split holds through prefill, question and decoding alike. Live tokens keep their residual too: a
token leaving the window cannot get it back later. Nothing is ever dropped, so attention sees
exactly the full cache.

Memory: a residual is ``hidden_size`` values per token and layer, a K/V entry ``2 × kv_heads ×
head_dim``. On GQA models the residual is often the larger (1.5× on SmolLM2-135M), and then this
cache holds more bytes than the full one; the rows' ``kv_bytes_physical`` show it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kvbench.core.attention import layer_rotaries, project_keys_values
from kvbench.core.budget import kept_count
from kvbench.core.cache import EvictableCache, EvictableLayer, nbytes_of
from kvbench.core.method import Method, register_method


@register_method
@dataclass
class KVDirect(Method):
    """No sinks (nothing is evicted, so none need protecting); one window for every layer and head."""

    name = "kvdirect"
    manages_cache = True

    sinks: int = 0

    def __post_init__(self):
        if self.allocation != "uniform":
            raise ValueError(f"kvdirect keeps one live window for every layer and head: allocation "
                             f"{self.allocation!r} does not apply (use uniform)")

    def new_cache(self, model, context_tokens: int, ratio: float) -> ResidualCache:
        return ResidualCache(model, window=kept_count(context_tokens, ratio))



def _append(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=1)


class ResidualLayer(EvictableLayer):
    """``keys``/``values`` hold the live window; ``checkpoints`` the residuals of older tokens.

    Checkpointed tokens are always the oldest ones, at positions ``0 .. checkpointed - 1``: the
    cache starts at position 0 and never evicts, so cache order is position order.
    """

    def __init__(self, decoder_layer: nn.Module, rotary: Callable, window: int):
        super().__init__()
        self.decoder_layer, self.rotary, self.window = decoder_layer, rotary, window
        self.checkpoints: torch.Tensor | None = None  # (B, checkpointed, hidden): K/V dropped
        self.window_residuals: torch.Tensor | None = None  # (B, live, hidden): for when they leave
        self.incoming: torch.Tensor | None = None  # residuals of the tokens being fed (set by a hook)
        self.recomputed_bytes = 0  # the last recomputed K/V: transient, but real at its peak

    def empty(self) -> "ResidualLayer":
        return ResidualLayer(self.decoder_layer, self.rotary, self.window)

    @property
    def checkpointed(self) -> int:
        return 0 if self.checkpoints is None else self.checkpoints.shape[1]

    def get_seq_length(self) -> int:
        """Tokens held, checkpointed and live: the length attention sees."""
        return self.checkpointed + super().get_seq_length()

    def recompute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (post-RoPE) and values ``(B, Hkv, checkpointed, D)`` of the checkpointed tokens."""
        positions = torch.arange(self.checkpointed, device=self.checkpoints.device).unsqueeze(0)
        cos, sin = self.rotary(self.checkpoints, positions)
        normed = self.decoder_layer.input_layernorm(self.checkpoints)
        return project_keys_values(self.decoder_layer.self_attn, normed, cos, sin)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.incoming is None or self.incoming.shape[1] != key_states.shape[2]:
            raise RuntimeError("ResidualLayer.update without the residuals of the new tokens: "
                               "feed the model inside `with cache.feeding():`")
        live_keys, live_values = super().update(key_states, value_states, *args, **kwargs)
        self.window_residuals = _append(self.window_residuals, self.incoming)
        self.incoming = None
        if self.checkpointed:
            old_keys, old_values = self.recompute()
            keys, values = torch.cat([old_keys, live_keys], dim=2), torch.cat([old_values, live_values], dim=2)
            self.recomputed_bytes = nbytes_of(keys) + nbytes_of(values)
        else:
            keys, values = live_keys, live_values
        self._slide()
        return keys, values

    def _slide(self) -> None:
        """Move the oldest live tokens beyond ``window`` out: their K/V go, their residuals stay."""
        leaving = self.keys.shape[2] - self.window
        if leaving <= 0:
            return
        self.checkpoints = _append(self.checkpoints, self.window_residuals[:, :leaving])
        self.window_residuals = self.window_residuals[:, leaving:].contiguous()
        self.keys = self.keys[:, :, leaving:].contiguous()
        self.values = self.values[:, :, leaving:].contiguous()

    def keep(self, mask: torch.Tensor) -> None:
        raise NotImplementedError("a residual-checkpoint layer evicts nothing")

    def truncate(self, length: int) -> None:
        """Drop the newest tokens; only live ones can go (the window may have slid since)."""
        if length < self.checkpointed:
            raise ValueError(f"cannot truncate to {length}: {self.checkpointed} tokens are checkpointed")
        super().truncate(length - self.checkpointed)
        if self.window_residuals is not None:
            self.window_residuals = self.window_residuals[:, : length - self.checkpointed]

    def clone(self) -> "ResidualLayer":
        twin = super().clone()
        twin.checkpoints = None if self.checkpoints is None else self.checkpoints.clone()
        twin.window_residuals = None if self.window_residuals is None else self.window_residuals.clone()
        return twin

    @property
    def nbytes(self) -> int:
        """Live K/V plus every residual held, checkpointed or waiting in the window."""
        return super().nbytes + nbytes_of(self.checkpoints) + nbytes_of(self.window_residuals)


class ResidualCache(EvictableCache):
    """A :class:`ResidualLayer` per decoder layer of ``model``, each with a live window of ``window``."""

    rollback_restores = False  # answering slides the window: answers work on a clone

    def __init__(self, model: nn.Module, window: int):
        # each layer's own rotary table (Gemma 3 rotates local and global layers with different bases)
        layers = zip(model.model.layers, layer_rotaries(model))
        super().__init__(0, [ResidualLayer(layer, rotary, window) for layer, rotary in layers])

    @contextlib.contextmanager
    def feeding(self):
        """Capture each layer's input (the residual, before the input norm) for its ``update``."""
        def capture(layer: ResidualLayer):
            def hook(module, args):
                layer.incoming = args[0].detach()
            return hook

        handles = [layer.decoder_layer.input_layernorm.register_forward_pre_hook(capture(layer))
                   for layer in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            # one layer's recomputed K/V live while its attention runs: count the largest
            transient = max(layer.recomputed_bytes for layer in self.layers)
            self.note_peak(transient)
        return keys, values
