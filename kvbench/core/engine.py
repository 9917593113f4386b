"""The hot path's steps, each once: forward, prefill, score, evict, greedy decoding (batch size 1).

The order they run in — the pipeline — is ``kvbench.core.session``.

Positions and cache indices part ways as soon as something is evicted: a token's rotary position is
where it stood in the prompt, its cache index is where it sits now. The engine therefore always
passes explicit ``position_ids`` and lets ``kvbench.core.attention`` mask by cache layout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from kvbench.core.attention import ATTENTION_NAME, layer_rotaries
from kvbench.core.budget import Budget, protect
from kvbench.core.cache import EvictableCache, EvictableLayer, cache_argument
from kvbench.core.method import Method
from kvbench.core.packed import DEFAULT_DECODE_SLACK, PackedLayer
from kvbench.core.prompts import Layout
from kvbench.core.scoring import HiddenRecorder, ScoreStream, layer_view
from kvbench.core.sliding import SlidingLayer, sliding_window


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


LAYOUTS = ("packed", "padded")
# With stop strings, the answer is first checked after this many tokens, then after twice as many more
# each time: one schedule for one-at-a-time and batched decoding, so both cut answers at the same tokens.
STOP_CHECK_FIRST = 8


def new_cache(model: PreTrainedModel, layout: str = "packed", decode_slack: int = DEFAULT_DECODE_SLACK,
              kernels: str = "auto") -> EvictableCache:
    """An empty cache: a sliding-window layer where the model's attention slides, else a layer in
    ``layout``: ``packed`` (heads back to back, no padding whatever they keep; ``decode_slack``
    spare rows per head when decoding outgrows a segment) or ``padded`` (every head as long as the
    layer's fullest, plus a mask). ``kernels``: what a decoded token's attention runs through
    (``kvbench.core.attention.DECODE_KERNELS``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown cache layout {layout!r}; choose one of {', '.join(LAYOUTS)}")

    def full_layer() -> EvictableLayer:
        return EvictableLayer() if layout == "padded" else PackedLayer(decode_slack, kernels)

    windows = [sliding_window(attn) for attn in attention_modules(model)]
    cache = EvictableCache(0, [full_layer() if w is None else SlidingLayer(w) for w in windows])
    cache.decode_kernels = kernels
    return cache


def compressible_layers(model: PreTrainedModel) -> list[int]:
    """Indices of the layers eviction cuts: every layer whose attention does not slide (a
    sliding-window layer already holds no more than its window)."""
    return [i for i, attn in enumerate(attention_modules(model)) if sliding_window(attn) is None]


@torch.inference_mode()
def forward(model: PreTrainedModel, cache: EvictableCache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Run ``ids (B, n)`` at positions ``start..start+n-1`` (every row at the same positions: the
    cells of one context, :mod:`kvbench.core.batch`); logits of the last one only, ``(B, vocab)``."""
    positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)
    if isinstance(cache.layers[0], PackedLayer) and model.config._attn_implementation != ATTENTION_NAME:
        raise ValueError("a packed cache needs kvbench's attention: call kvbench.core.attention.install(model)")
    with cache.feeding():
        out = model(input_ids=ids, **cache_argument(model, cache), position_ids=positions, use_cache=True,
                    logits_to_keep=1, kvbench_cache=cache)
    return out.logits[:, -1]


def prefill(
    model: PreTrainedModel,
    cache: EvictableCache,
    ids: torch.Tensor,
    start: int,
    chunk: int,
    after_chunk: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Feed ``ids`` in chunks of ``chunk`` tokens; the vocab head runs on one position per chunk.

    ``after_chunk(tokens_seen)`` runs after every chunk: eviction during prefill. Sliding-window
    layers are trimmed to their window after every chunk first.
    """
    logits = None
    for offset in range(0, ids.shape[1], chunk):
        piece = ids[:, offset : offset + chunk]
        logits = forward(model, cache, piece, start + offset)
        cache.slide()
        if after_chunk is not None:
            after_chunk(start + offset + piece.shape[1])
    return logits


@torch.inference_mode()
def score_layers(
    model: PreTrainedModel,
    cache: EvictableCache,
    method: Method,
    context_ids: torch.Tensor | None = None,
    stream: ScoreStream | None = None,
    recorder: HiddenRecorder | None = None,
    ratio: float | None = None,
    question: int = 0,
) -> list[torch.Tensor]:
    """Each layer's scores ``(B, Hkv, slots)``, float32, padded slots at -inf; zeros for a
    sliding-window layer, which is never scored nor cut.

    In order: the method's own forward passes over the whole cache (KVzip, given the context ids),
    what ``stream`` scored inside the last forward, or each layer's :class:`LayerView` with the
    attention inputs ``recorder`` kept (none for methods that read keys only). ``ratio`` reaches
    only a method whose scores depend on it (``Method.ratio_dependent``); ``question``: the
    question's length at the end of a query-aware unit (0: none).
    """
    whole = method.score_cache(model, cache, context_ids) if context_ids is not None else None
    if whole is None and stream is not None:
        whole = stream.scores_of(method)
    if whole is None:
        whole = []
        rotaries = layer_rotaries(model)
        for layer_idx, (attn, layer) in enumerate(zip(attention_modules(model), cache.layers)):
            if not layer.compressible:
                whole.append(None)  # never cut: not scored
                continue
            hidden = recorder.hidden[layer_idx] if recorder else None
            cos, sin = recorder.rotary_tables(layer_idx) if recorder and hidden is not None else (None, None)
            whole.append(method.score(layer_view(layer, layer_idx, attn, method, hidden, cos, sin, ratio,
                                                 rotaries[layer_idx], question)))
    return [
        layer.keys.new_zeros(layer.keys.shape[:3], dtype=torch.float32) if not layer.compressible
        else s.float() if layer.valid is None else s.float().masked_fill(~layer.valid, float("-inf"))
        for s, layer in zip(whole, cache.layers)
    ]


@dataclass
class Eviction:
    entries_before: int
    entries_after: int

    @classmethod
    def held(cls, cache: EvictableCache, tokens: int) -> "Eviction":
        """What a cache holds against the full cache of ``tokens`` tokens (a method's own prefill),
        over the layers eviction may shrink."""
        return cls(cache.full_entries(tokens), cache.compressible_entries())

    @property
    def measured_ratio(self) -> float:
        return 1.0 - self.entries_after / self.entries_before if self.entries_before else 0.0


def evict(cache: EvictableCache, scores: list[torch.Tensor], method: Method, budget: Budget, seen: int,
          layout: Layout = Layout(), decoding: bool = False) -> Eviction:
    """Keep the method's protected entries and the best of the rest, as ``budget`` says, of ``seen`` tokens.

    The sinks and the chat template's prefix (``layout.prefix``, unless the method protects nothing
    at the front: ``random``), and the method's recent window, are protected here, where the per-head
    budget is known; padded slots stay at -inf so they are never kept. ``decoding``: the eviction
    happens while answering (some methods keep another window then). In threshold mode the method's
    ``keep_mask`` decides instead of a budget.

    Only compressible layers are cut (sliding-window layers keep their window): the method's
    budget, allocation and ``after_eviction`` see those layers alone, in order, and the measured
    ratio is over them.
    """
    per_head = budget.kept(seen)
    first = max(method.sinks, layout.prefix) if method.protects_prefix else method.sinks
    recent = method.protected_recent(seen, per_head, decoding)
    targets = [i for i, layer in enumerate(cache.layers) if layer.compressible]
    if not targets:
        return Eviction(0, 0)
    layers = [cache.layers[i] for i in targets]
    protected = [protect(scores[i], first, recent, layer.valid) for i, layer in zip(targets, layers)]
    before = cache.compressible_entries()
    if budget.threshold_mode:
        masks = [method.keep_mask(s) for s in protected]
    else:
        masks = method.keep_masks(protected, seen, budget)
    for layer, mask in zip(layers, masks):
        layer.keep(mask)
    method.after_eviction(_Layers(cache, layers), masks, seen)
    return Eviction(before, cache.compressible_entries())


@dataclass
class _Layers:
    """The compressible layers of ``cache``, as ``after_eviction`` sees them (``.layers``)."""

    cache: EvictableCache
    layers: list


@torch.inference_mode()
def greedy(
    model: PreTrainedModel,
    cache: EvictableCache,
    first_logits: torch.Tensor,
    next_position: int,
    max_new_tokens: int,
    eos_ids: set[int],
    every: int = 0,
    on_interval: Callable[[int], None] | None = None,
    already: int = 0,
) -> list[int]:
    """Greedy decoding from the logits that predict the first answer token.

    With ``on_interval``, ``on_interval(tokens_seen)`` runs after every ``every`` generated tokens,
    counting the ``already`` generated by earlier calls: eviction during decoding.
    """
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
            if on_interval is not None and every and (already + step + 1) % every == 0:
                on_interval(next_position + step + 1)
    return tokens


def eos_ids(model: PreTrainedModel, tokenizer) -> set[int]:
    """Token ids that end an answer: the generation config's and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


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


class Evictor:
    """Evicts each time it is called: eviction during chunked prefill or decoding.

    Only incremental methods qualify. Methods that read every token's attention input are scored
    inside each forward by ``stream`` (nothing is recorded); those that read the last few (TOVA's
    last query) find them in ``recorder``; the others (window, random) score the cache's keys.
    """

    def __init__(self, model: PreTrainedModel, cache: EvictableCache, method: Method, budget: Budget,
                 stream: ScoreStream | None = None, recorder: HiddenRecorder | None = None,
                 layout: Layout = Layout(), decoding: bool = False):
        self.model, self.cache, self.method, self.budget = model, cache, method, budget
        self.stream, self.recorder = stream, recorder
        self.layout, self.decoding = layout, decoding  # what evict protects, and when it runs
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, seen: int) -> None:
        with Timer(self.cache.layers[0].keys.device) as timer:
            scores = score_layers(self.model, self.cache, self.method, stream=self.stream, recorder=self.recorder,
                                  ratio=self.budget.ratio)
            evict(self.cache, scores, self.method, self.budget, seen, self.layout, self.decoding)
        self.seconds += timer.seconds
        self.calls += 1
