"""Benchmark tasks, one module per family (RULER, LongBench, code, math), plus ``metrics.py``.

Each module subclasses :class:`kvbench.core.task.Task` and registers it with ``@register_task``;
importing this package imports them all. Drivers find tasks through ``kvbench.plugins``.
"""

from __future__ import annotations

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
