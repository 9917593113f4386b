"""The hot path, in the order it runs: prefill → score → evict → decode, batch size 1.

Positions and cache indices part ways as soon as something is evicted: a token's rotary position is
where it stood in the prompt, its cache index is where it sits now. The engine therefore always
passes explicit ``position_ids`` and lets ``kvbench.attention`` mask by cache layout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from kvbench.budget import protect, uniform_keep
from kvbench.cache import EvictableCache
from kvbench.methods import Method
from kvbench.scoring import HiddenRecorder, LayerView


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def new_cache(model: PreTrainedModel) -> EvictableCache:
    return EvictableCache(model.config.num_hidden_layers)


@torch.inference_mode()
def forward(model: PreTrainedModel, cache: EvictableCache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Run ``ids (1, n)`` at positions ``start..start+n-1``; logits of the last one only."""
    positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
    out = model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


def prefill(model: PreTrainedModel, cache: EvictableCache, ids: torch.Tensor, start: int, chunk: int) -> torch.Tensor:
    """Feed ``ids`` in chunks of ``chunk`` tokens; the vocab head runs on one position per chunk."""
    logits = None
    for offset in range(0, ids.shape[1], chunk):
        logits = forward(model, cache, ids[:, offset : offset + chunk], start + offset)
    return logits


@torch.inference_mode()
def score_layers(
    model: PreTrainedModel,
    cache: EvictableCache,
    method: Method,
    recorder: HiddenRecorder | None,
    context_ids: torch.Tensor,
) -> list[torch.Tensor]:
    """Each layer's scores with the method's protected entries set to +inf."""
    whole = method.score_cache(model, cache, context_ids)
    if whole is not None:
        return [protect(s.float(), method.sinks, method.protected_recent(s.shape[-1])) for s in whole]
    scores = []
    for layer_idx, (attn, layer) in enumerate(zip(attention_modules(model), cache.layers)):
        hidden = recorder.hidden[layer_idx] if recorder else None
        empty = layer.keys[:, 0, :0]  # (B, 0, D): nothing recorded
        view = LayerView(
            layer_idx=layer_idx,
            attn=attn,
            keys=layer.keys,
            values=layer.values,
            hidden=hidden if hidden is not None else empty,
            cos=recorder.cos if recorder and recorder.cos is not None else empty,
            sin=recorder.sin if recorder and recorder.sin is not None else empty,
        )
        total = layer.keys.shape[2]
        scores.append(protect(method.score(view).float(), method.sinks, method.protected_recent(total)))
    return scores


@dataclass
class Eviction:
    entries_before: int
    entries_after: int

    @property
    def measured_ratio(self) -> float:
        return 1.0 - self.entries_after / self.entries_before if self.entries_before else 0.0


def evict(cache: EvictableCache, scores: list[torch.Tensor], ratio: float) -> Eviction:
    """Keep the top entries of every head (uniform allocation), shrinking the cache tensors."""
    before = cache.entries()
    for layer, layer_scores in zip(cache.layers, scores):
        layer.keep(uniform_keep(layer_scores, ratio))
    return Eviction(before, cache.entries())


@torch.inference_mode()
def greedy(
    model: PreTrainedModel,
    cache: EvictableCache,
    first_logits: torch.Tensor,
    next_position: int,
    max_new_tokens: int,
    eos_ids: set[int],
) -> list[int]:
    """Greedy decoding from the logits that predict the first answer token."""
    tokens: list[int] = []
    logits = first_logits
    for step in range(max_new_tokens):
        token = int(logits.argmax(dim=-1))
        if token in eos_ids:
            break
        tokens.append(token)
        if step + 1 < max_new_tokens:
            ids = torch.tensor([[token]], device=first_logits.device)
            logits = forward(model, cache, ids, next_position + step)
    return tokens


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock seconds of a block, synchronising CUDA so kernels are counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
