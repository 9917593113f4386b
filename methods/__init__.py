"""Eviction methods: one module each, registered with :func:`register_method`.

A method is a dataclass whose fields are its hyperparameters (defaults from its paper or reference
code) and whose :meth:`Method.score` says how much each context KV entry of one layer matters.
Choosing the kept set (protected sinks and windows, budgets, top-k) and gathering the cache are the
engine's job (``kvbench.budget``, ``kvbench.engine``), so a method file reads like its equation.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.budget import select
from kvbench.scoring import LayerView


@dataclass
class Method:
    """Base class. ``sinks``: leading tokens never evicted (DESIGN §3); ``allocation``: how the
    budget is shared among layers and heads (``kvbench.budget``), each method's default its paper's.
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

    def protected_recent(self, total: int, budget: int) -> int:
        """How many of the most recent of ``total`` slots this method always keeps, given a
        per-head ``budget``; they count inside the budget."""
        return 0

    def ratio_dependent(self) -> bool:
        """True when ``score`` reads ``view.ratio`` (CriticalKV's stage-1 budget, Compactor's
        blend): such a method is scored once per ratio instead of once for every ratio."""
        return False

    def keep_masks(self, scores: list[torch.Tensor], seen: int, ratio: float) -> list[torch.Tensor]:
        """Kept entries per layer ``(B, H, slots)`` from protected scores (sinks and windows at
        +inf, padding at -inf). The default is top-k under the method's allocation; methods that
        choose differently (whole chunks, per-layer budgets, per-head floors) override it."""
        return select(scores, seen, ratio, self.allocation)

    def after_eviction(self, cache, masks: list[torch.Tensor], seen: int) -> None:
        """Called once the cache holds only the kept entries (``masks`` as passed to
        ``keep``): KeyRerotation re-rotates the kept keys here."""

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
            self.base = get_method(self.default_base)
        if not isinstance(self.base, Method) or not self.base.evicts or self.base.manages_cache:
            raise ValueError(f"{self.name} wraps a scoring method, not {self.base!r}")

    def setup(self, model, tokenizer=None) -> None:
        self.base.setup(model, tokenizer)

    def hidden_window(self) -> int | None:
        return self.base.hidden_window()

    def protected_recent(self, total: int, budget: int) -> int:
        return self.base.protected_recent(total, budget)

    def ratio_dependent(self) -> bool:
        return self.base.ratio_dependent()

    def score(self, view: LayerView) -> torch.Tensor:
        return self.base.score(view)

    def score_cache(self, model, cache, context_ids: torch.Tensor) -> list[torch.Tensor] | None:
        return self.base.score_cache(model, cache, context_ids)

    def config(self) -> dict[str, Any]:
        """The wrapper's fields, with ``base`` as ``{"name": ..., **its config}``."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "base"}
        return {**own, "base": {"name": self.base.name, **self.base.config()}}


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    METHODS[cls.name] = cls
    return cls


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def list_methods() -> list[str]:
    _import_all()
    return sorted(METHODS)


def get_method(name: str, **config: Any) -> Method:
    """Instantiate a registered method; unknown config keys are an error."""
    _import_all()
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(config) - fields
    if unknown:
        raise KeyError(f"method {name!r} has no option(s) {', '.join(sorted(unknown))}; it has {', '.join(sorted(fields))}")
    return cls(**config)
