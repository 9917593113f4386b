"""What a method sees when it scores a layer, and how prefill feeds it.

Two ways to feed a method the attention inputs it reads:

- :class:`ScoreStream`, for methods that read every token's attention input (gated, kvzap, h2o):
  each layer is scored inside the forward, as soon as that layer's inputs and keys exist, and the
  inputs are dropped with the chunk. What the method accumulates lives in the cache layer's state,
  so the memory a method adds to a prefill is its state, never a copy of every layer's inputs.
- :class:`HiddenRecorder`, for methods that read a window of the last tokens (SnapKV's 64 queries):
  keeps only those rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field

import torch
from torch import nn

from kvbench.core.attention import project_queries


class StateView(MutableMapping):
    """One method's slice of a layer's per-entry state: its keys, under the method's own prefix.

    Several methods scored from one prefill keep their state in the same layer without colliding;
    the cache gathers, rolls back and counts every entry alike.
    """

    def __init__(self, state: dict[str, torch.Tensor], prefix: str):
        self._state, self._prefix = state, prefix

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._state[self._prefix + key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self._state[self._prefix + key] = value

    def __delitem__(self, key: str) -> None:
        del self._state[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        return (k[len(self._prefix):] for k in list(self._state) if k.startswith(self._prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass
class LayerView:
    """One layer's cache plus the attention inputs of the last ``hidden.shape[1]`` tokens fed.

    ``hidden`` is the attention input (after the layer's input norm, before the projections), as
    Fast KVzip and KVzap read it; ``cos``/``sin`` are the rotary tables at those tokens' positions.
    For incremental methods (scored inside the forward, during chunked prefill or decoding) these
    are exactly the tokens fed since the method last scored; their entries are the last slots of
    every head. ``valid`` marks real slots of a padded layout (None: all real); ``state`` is this
    method's per-entry state in the layer, gathered and rolled back with the cache. ``ratio`` is set
    only for a method whose ``ratio_dependent()`` is true; ``rotary`` builds rotary tables at
    positions not yet seen (Expected Attention averages RoPE over future positions); ``question``
    is how many of the last tokens are the question in a query-aware unit (FINCH's window).
    """

    layer_idx: int
    attn: nn.Module
    keys: torch.Tensor  # (B, Hkv, T, D), post-RoPE as cached
    values: torch.Tensor  # (B, Hkv, T, D)
    hidden: torch.Tensor  # (B, n, d): attention inputs of the last n context tokens
    cos: torch.Tensor  # (B, n, D)
    sin: torch.Tensor  # (B, n, D)
    valid: torch.Tensor | None = None  # (B, Hkv, T) bool
    state: MutableMapping[str, torch.Tensor] = field(default_factory=dict)
    ratio: float | None = None  # the target ratio, only for methods whose scores depend on it
    rotary: Callable | None = None  # this layer's rotary embedding: ``rotary(x, position_ids) -> cos, sin``
    question: int = 0  # the last `question` tokens are the question (query-aware units; 0: none)

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


def layer_view(layer, layer_idx: int, attn: nn.Module, method, hidden: torch.Tensor | None = None,
               cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, ratio: float | None = None,
               rotary: Callable | None = None, question: int = 0) -> LayerView:
    """The view ``method`` scores of cache ``layer``, with the attention inputs given (or none)."""
    empty = layer.keys[:, 0, :0]  # (B, 0, D): nothing recorded
    return LayerView(
        layer_idx=layer_idx, attn=attn, keys=layer.keys, values=layer.values,
        hidden=empty if hidden is None else hidden, cos=empty if cos is None else cos,
        sin=empty if sin is None else sin, valid=layer.valid, state=StateView(layer.state, method.state_prefix),
        ratio=ratio if method.ratio_dependent() else None, rotary=rotary, question=question,
    )


class ScoreStream:
    """Scores ``methods`` layer by layer inside each forward pass over ``cache``.

    A pre-hook on every attention module takes the chunk's attention inputs; a post-hook, which runs
    once the layer's cache holds the chunk's keys, lets each method score the new tokens. The latest
    scores of every layer are kept per method (``scores``), with the seconds spent (``seconds``).
    """

    def __init__(self, attention_modules: list[nn.Module], cache, methods: list, rotaries: list | None = None):
        self.cache, self.methods = cache, list(methods)
        self.rotaries = rotaries or [None] * len(attention_modules)  # each layer's (``layer_rotaries``)
        self.scores: dict[str, list[torch.Tensor | None]] = {m.state_prefix: [None] * len(attention_modules)
                                                              for m in self.methods}
        self.seconds: dict[str, float] = {m.state_prefix: 0.0 for m in self.methods}
        self._inputs: dict[int, tuple] = {}
        self._handles = []
        if self.methods:
            for index, module in enumerate(attention_modules):
                self._handles.append(module.register_forward_pre_hook(self._take(index), with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._score(index, module), with_kwargs=True))

    def _take(self, index: int):
        def hook(module, args, kwargs):
            cos, sin = kwargs["position_embeddings"]
            self._inputs[index] = (kwargs["hidden_states"].detach(), cos, sin)
        return hook

    def _score(self, index: int, module: nn.Module):
        def hook(module_, args, kwargs, output):
            hidden, cos, sin = self._inputs.pop(index)
            layer = self.cache.layers[index]
            if not layer.compressible:  # a sliding-window layer is never cut: nothing to score
                for method in self.methods:
                    self.scores[method.state_prefix][index] = layer.keys.new_zeros(layer.keys.shape[:3])
                return
            for method in self.methods:
                start = time.perf_counter()
                view = layer_view(layer, index, module, method, hidden, cos, sin, rotary=self.rotaries[index])
                self.scores[method.state_prefix][index] = method.score(view)
                self.seconds[method.state_prefix] += time.perf_counter() - start
        return hook

    def scores_of(self, method) -> list[torch.Tensor] | None:
        """Each layer's latest scores for ``method``, or None if it has not scored every layer."""
        held = self.scores.get(method.state_prefix)
        return None if held is None or any(s is None for s in held) else list(held)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "ScoreStream":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class HiddenRecorder:
    """Records each layer's attention inputs and rotary tables while the context is prefilled.

    A forward pre-hook on every attention module keeps the last ``keep`` rows (``None``: all rows),
    so a method that reads only a window of queries costs a window of memory, not the context.
    Rotary tables are kept once per distinct table the model hands its layers (one for Llama; one
    per layer type for Gemma 3, whose local and global layers rotate with different bases):
    :meth:`rotary_tables` gives a layer its own.
    """

    def __init__(self, attention_modules: list[nn.Module], keep: int | None):
        self.keep = keep
        self.hidden: list[torch.Tensor | None] = [None] * len(attention_modules)
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # owner layer -> (cos, sin)
        self._owner: dict[int, int] = {}  # layer -> the first layer handed the same table
        self._this_forward: dict[int, int] = {}  # id(cos) -> owner, within one forward
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
            cos, sin = kwargs["position_embeddings"]
            if layer_idx == 0:
                self._this_forward = {}
            owner = self._owner.setdefault(layer_idx, self._this_forward.setdefault(id(cos), layer_idx))
            if owner == layer_idx:
                old_cos, old_sin = self._tables.get(layer_idx, (None, None))
                self._tables[layer_idx] = (self._tail(old_cos, cos), self._tail(old_sin, sin))

        return hook

    def rotary_tables(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``(B, n, D)`` of layer ``layer_idx`` at the recorded tokens' positions."""
        return self._tables[self._owner[layer_idx]]

    @property
    def nbytes(self) -> int:
        return self.nbytes_of_last(None)

    def nbytes_of_last(self, rows: int | None) -> int:
        """Bytes of the last ``rows`` recorded rows (None: all): what a method reading only those
        would have had recorded, when one recorder served several."""
        if rows == 0:
            return 0
        tables = [t for pair in self._tables.values() for t in pair]
        tensors = [t if rows is None else t[:, -rows:] for t in [*self.hidden, *tables] if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> "HiddenRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


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
