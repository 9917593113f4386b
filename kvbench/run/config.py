"""What a run is asked to do, and the one place that checks it before anything loads.

:class:`RunConfig`'s defaults are the command line's defaults (the CLI reads them from here).
:func:`plan` turns a config into methods, budgets, a task and its subtasks, or raises a one-line
:class:`~kvbench.errors.UsageError` — before the model is loaded and before anything is written.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from kvbench.defaults import DEFAULT_MODEL, DEFAULT_TASK
from kvbench.errors import UsageError

if TYPE_CHECKING:  # the engine is imported when a plan is made, not when a config is (kvbench --help)
    from kvbench.core.budget import Budget
    from kvbench.core.method import Method
    from kvbench.core.task import Task


@dataclass
class RunConfig:
    methods: list[str]  # method specs: "snapkv", "snapkv:window_size=32"
    ratios: list[float]
    model: str = DEFAULT_MODEL
    task: str = DEFAULT_TASK
    length: int = 1024
    samples: int = 4
    query_aware: bool = False
    device: str | None = None
    dtype: str | None = None
    prefill_chunk: int = 512
    out: Path = Path("results")
    seed: int = 0
    baseline: bool = True  # also answer with the full cache (feeds token_match)
    allocation: str | None = None  # None: each method's own default
    evict_during_prefill: bool = False
    evict_during_decoding: bool = False
    decode_interval: int = 128
    cache_layout: str = "packed"  # packed (no padding) or padded: kvbench.core.engine.new_cache
    kernels: str = "auto"  # the packed layout's decode attention on CUDA: auto, triton or torch
    decode_batch: int = 1  # cells of one context decoded together (1: one at a time): kvbench.core.batch
    shard: tuple[int, int] = (0, 1)  # (index, count): this process takes samples index, index+count, ...
    resume: bool = False  # skip samples whose rows are already in `out` (kvbench sweep)
    retry_errors: bool = False  # resume: run again the rows written with an error
    trust_remote_code: bool = False
    method_options: dict[str, dict] = field(default_factory=dict)  # by method name: --weights, --threshold
    command: str = ""
    data_dir: Path | None = None  # --data-dir: local copies of a task's data files
    max_context: int | None = None  # --max-context: prompt tokens kept by tasks that truncate (LongBench)


@dataclass
class Plan:
    methods: list[Method]  # evicting methods (not `full`)
    task: Task
    subtasks: list[str]
    ratios: list[float]

    def budgets(self, method: Method) -> list[Budget]:
        """A threshold method's one cell (ratio measured), or one budget per requested ratio."""
        from kvbench.core.budget import Budget

        if method.threshold_mode:
            return [Budget(None, method.allocation)]
        return [Budget(r, method.allocation) for r in self.ratios]


def parse_task(spec: str) -> tuple[str, list[str] | None]:
    """``"ruler"`` → all subtasks; ``"ruler:niah_single_1,vt"`` → those."""
    name, _, subtasks = spec.partition(":")
    return name, [s for s in subtasks.split(",") if s] or None


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"--{name} must be at least {minimum}, not {value}")


def check_ratio(ratio: float) -> float:
    if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise UsageError(f"ratio {ratio} is outside [0, 1): it is the fraction of the context evicted")
    return ratio


def make_methods(config: RunConfig) -> list[Method]:
    """Every method spec built, with the run's seed, allocation and per-method options."""
    from kvbench.core.budget import ALLOCATIONS
    from kvbench.plugins import SpecError, build_method, list_methods, split_spec

    if not config.methods:
        raise UsageError(f"no method given (known: {', '.join(list_methods())})")
    methods = []
    for spec in config.methods:
        try:
            name, options = split_spec(spec)
            if name not in list_methods():
                raise SpecError(f"unknown method {name!r} (known: {', '.join(list_methods())})")
            options = {**options, **config.method_options.get(name, {})}
            defaults = {"seed": config.seed}
            if config.allocation is not None and name != "full":
                if config.allocation not in ALLOCATIONS:
                    raise UsageError(f"unknown allocation {config.allocation!r} (choose {', '.join(ALLOCATIONS)})")
                options.setdefault("allocation", config.allocation)
            methods.append(build_method(name, options, defaults, spec))
        except (SpecError, ValueError) as err:
            raise UsageError(str(err).strip("'\"")) from None
    specs = [m.spec() for m in methods]
    for spec in specs:
        if specs.count(spec) > 1:
            raise UsageError(f"method {spec} is given twice")
    return methods


def _evicts_while_filling(name: str) -> bool:
    """Whether method ``name``, as built by default, can evict during prefill and decoding (a
    wrapper can when its default base can)."""
    from kvbench.plugins import get_method

    try:
        return get_method(name).incremental
    except (TypeError, ValueError):  # a plugin that cannot be built without options
        return False


def _check_ratios(config: RunConfig, methods: list[Method]) -> None:
    """A ratio for every method that needs one; none above 0 where only threshold methods run
    (they measure their ratio: a requested one would be silently ignored)."""
    evicting = [m for m in methods if m.evicts]
    by_ratio = [m.name for m in evicting if not m.threshold_mode]
    if not config.ratios and (by_ratio or not evicting):
        raise UsageError(f"no ratio given (needed by {', '.join(by_ratio) or 'full: use --ratio 0'})")
    if evicting and not by_ratio and any(r > 0 for r in config.ratios):
        names = ", ".join(m.name for m in evicting)
        hint = " (kvzap_ratio cuts KVzap's scores to a ratio)" if any(m.name == "kvzap" for m in evicting) else ""
        verb = "s" if len(evicting) == 1 else ""
        raise UsageError(f"{names} evict{verb} by threshold and measure{verb} the ratio: drop --ratio{hint}")


def plan(config: RunConfig) -> Plan:
    """Check everything that can be checked before loading the model."""
    from kvbench.plugins import list_methods

    for ratio in config.ratios:
        check_ratio(ratio)
    if len(set(config.ratios)) != len(config.ratios):
        raise UsageError(f"a ratio is given twice: {', '.join(map(str, config.ratios))}")
    methods = make_methods(config)
    if [m.name for m in methods] == ["full"] and any(r > 0 for r in config.ratios):
        raise UsageError("method 'full' evicts nothing: use --ratio 0 (or pick an eviction method)")
    _check_ratios(config, methods)
    _positive("samples", config.samples)
    _positive("prefill-chunk", config.prefill_chunk)
    _positive("decode-interval", config.decode_interval)
    _positive("decode-batch", config.decode_batch)
    _positive("length", config.length, 64)
    _positive("max-context", config.max_context, 16)
    for method in methods:
        for flag, wanted in [("prefill", config.evict_during_prefill), ("decoding", config.evict_during_decoding)]:
            if wanted and method.evicts and not method.incremental and not method.manages_cache:
                able = ", ".join(n for n in list_methods() if _evicts_while_filling(n))
                raise UsageError(f"{method.name} cannot evict during {flag}: it scores the whole context at once "
                                 f"(methods that can: {able})")
        if method.reads_question and not config.query_aware:
            raise UsageError(f"{method.name}'s window is the question: run it with --query-aware (or set "
                             f"{method.name}:window_size=N for the last N context tokens)")
    task, subtasks = _task(config)
    return Plan([m for m in methods if m.evicts], task, subtasks, list(config.ratios))


def _task(config: RunConfig) -> tuple[Task, list[str]]:
    from kvbench.plugins import get_task, list_tasks

    name, subtasks = parse_task(config.task)
    if name not in list_tasks():
        raise UsageError(f"unknown task {name!r} (known: {', '.join(list_tasks())})")
    task = get_task(name)
    task.data_dir, task.max_context = config.data_dir, config.max_context  # before unavailable(): it may read them
    unavailable = task.unavailable()
    if subtasks is None:
        subtasks = [s for s in task.subtasks() if s not in unavailable]
        for skipped, reason in unavailable.items():
            print(f"kvbench: skipping {name}:{skipped}: {reason}", file=sys.stderr)
    for sub in subtasks:
        if sub not in task.subtasks():
            raise UsageError(f"unknown subtask {name}:{sub} (known: {', '.join(task.subtasks())})")
        if sub in unavailable:
            raise UsageError(f"{name}:{sub} is unavailable here: {unavailable[sub]}")
    if len(set(subtasks)) != len(subtasks):
        raise UsageError(f"a subtask of {name} is given twice")
    if not subtasks:
        raise UsageError(f"no subtask of {name} is available here")
    return task, subtasks
