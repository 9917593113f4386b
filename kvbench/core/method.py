"""The method contract: what an eviction method is, as the engine sees it.

A method is a dataclass whose fields are its hyperparameters (defaults from its paper or reference
code) and whose :meth:`Method.score` says how much each context KV entry of one layer matters.
Choosing the kept set (protected sinks and windows, budgets, top-k) and gathering the cache are the
engine's job (``kvbench.core.budget``, ``kvbench.core.engine``), so a method file reads like its
equation. Methods register themselves with :func:`register_method`; drivers find them through
``kvbench.plugins``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.core.budget import Budget, select
from kvbench.core.registry import Registry
from kvbench.core.scoring import LayerView


@dataclass
class Method:
    """Base class. ``sinks``: leading tokens never evicted (attention sinks); ``allocation``: how the
    budget is shared among layers and heads (``kvbench.core.budget``), each method's default its paper's.
    """

    name: ClassVar[str] = ""
    evicts: ClassVar[bool] = True  # False only for `full`
    # Can score new tokens without seeing the rest of the context, so it may evict during chunked
    # prefill and during decoding; `score` then receives only the tokens fed since it last scored
    # and keeps whatever it accumulates in `view.state`.
    incremental: ClassVar[bool] = False
    # Builds and runs its own cache (`new_cache`) instead of being scored and evicted by the
    # engine: KV-Direct, whose cache changes representation rather than dropping entries.
    manages_cache: ClassVar[bool] = False
    # Keeps the chat template's prefix (system prompt, user header) as it keeps the sinks: KVzip keeps
    # it outside the compressed span. False only for `random`, which may evict anything.
    protects_prefix: ClassVar[bool] = True

    sinks: int = 4
    seed: int = 0
    allocation: str = "uniform"

    def score(self, view: LayerView) -> torch.Tensor:
        """Importance of each entry, ``(batch, kv_heads, entries)``; higher is kept."""
        raise NotImplementedError

    def score_cache(self, model, cache, context_ids: torch.Tensor) -> list[torch.Tensor] | None:
        """Score every layer at once with extra forward passes (KVzip's reconstruction), or None.

        Most methods score each layer from its :class:`LayerView`; a method that must run the model
        again overrides this and leaves ``cache`` exactly as it found it.
        """
        return None

    def new_cache(self, model, context_tokens: int, ratio: float):
        """The empty cache a ``manages_cache`` method prefills ``context_tokens`` into at ``ratio``."""
        raise NotImplementedError(f"{self.name} is scored and evicted by the engine")

    def setup(self, model, tokenizer=None) -> None:
        """Called once the model is loaded, before any sample: load weights, check shapes."""

    def hidden_window(self) -> int | None:
        """How many trailing attention inputs per layer `score` reads (None: every context token)."""
        return 0

    def protected_recent(self, seen: int, budget: int, decoding: bool = False) -> int:
        """How many of each head's most recent tokens this method always keeps, of ``seen`` tokens,
        given a per-head ``budget``; ``decoding`` is True for evictions while answering. They count
        inside the budget unless ``keep_masks`` says otherwise."""
        return 0

    @property
    def reads_question(self) -> bool:
        """True when ``score`` reads the question at the end of a query-aware unit
        (``view.question``, FINCH's window): the method then needs ``--query-aware``."""
        return False

    def keep_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Threshold mode only: the entries this method keeps, from protected ``scores``."""
        raise NotImplementedError(f"{self.name} has no threshold mode")

    def ratio_dependent(self) -> bool:
        """True when ``score`` reads ``view.ratio`` (CriticalKV's stage-1 budget, Compactor's
        blend): such a method is scored once per ratio instead of once for every ratio."""
        return False

    def keep_masks(self, scores: list[torch.Tensor], seen: int, budget: Budget) -> list[torch.Tensor]:
        """Kept entries per layer ``(B, H, slots)`` from protected scores (sinks and windows at
        +inf, padding at -inf). The default is top-k under the budget's allocation; methods that
        choose differently (whole chunks, per-layer budgets, per-head floors) override it."""
        return select(scores, seen, budget)

    def after_eviction(self, cache, masks: list[torch.Tensor], seen: int) -> None:
        """Called once the cache holds only the kept entries (``masks`` as passed to
        ``keep``): KeyRerotation re-rotates the kept keys here. ``cache.layers`` are the layers
        eviction cut, one per mask (sliding-window layers are not among them)."""

    @property
    def threshold_mode(self) -> bool:
        """True when the method chooses its own kept set (KVzap with a threshold): no target ratio."""
        return getattr(self, "threshold", None) is not None

    def spec(self) -> str:
        """The method spec that rebuilds this method: its name and every field not at its default
        (a nested method as ``base=NAME`` and ``base.FIELD=VALUE``)."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Method):
                parts.append(f"{f.name}={value.name}")
                parts += [f"{f.name}.{p}" for p in value.spec().partition(":")[2].split(",") if p]
            elif value != _default(f):
                parts.append(f"{f.name}={'none' if value is None else value}")
        return self.name + (":" + ",".join(parts) if parts else "")

    @property
    def state_prefix(self) -> str:
        """Where this method keeps per-entry state in a cache layer (``layer.state``): its spec, so
        two configurations scored from one prefill never share state."""
        return self.spec() + "/"

    def config(self) -> dict[str, Any]:
        """Every field's value; a nested method (a wrapper's ``base``) as its name and config."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = {"name": value.name, **value.config()} if isinstance(value, Method) else value
        return out


@dataclass
class Wrapper(Method):
    """A method that changes how another method's scores are used (kvpress's wrapper presses).

    ``base`` is the inner scorer; None picks the wrapper's ``default_base``. What the engine reads
    from a method (``sinks``, ``allocation``, ``protected_recent``) is the wrapper's own; what
    scoring needs (``hidden_window``, ``score``) comes from the base.
    """

    default_base: ClassVar[str] = "snapkv"
    base: Method | None = None

    def __post_init__(self) -> None:
        if self.base is None:
            self.base = METHODS[self.default_base]()
        if not isinstance(self.base, Method) or not self.base.evicts or self.base.manages_cache:
            raise ValueError(f"{self.name} wraps a scoring method, not {self.base!r}")

    @property
    def incremental(self) -> bool:  # type: ignore[override]
        return self.base.incremental

    def setup(self, model, tokenizer=None) -> None:
        self.base.setup(model, tokenizer)

    def hidden_window(self) -> int | None:
        return self.base.hidden_window()

    def protected_recent(self, seen: int, budget: int, decoding: bool = False) -> int:
        return self.base.protected_recent(seen, budget, decoding)

    @property
    def reads_question(self) -> bool:  # type: ignore[override]
        return self.base.reads_question

    def ratio_dependent(self) -> bool:
        return self.base.ratio_dependent()

    def score(self, view: LayerView) -> torch.Tensor:
        return self.base.score(view)

    def score_cache(self, model, cache, context_ids: torch.Tensor) -> list[torch.Tensor] | None:
        return self.base.score_cache(model, cache, context_ids)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


METHODS: Registry[Method] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name`` (a second class of that name is an error)."""
    return METHODS.register(cls)
