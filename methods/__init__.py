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

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
