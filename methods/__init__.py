"""Eviction methods, one module each; importing this package imports and registers them all.

Each module defines a dataclass subclass of :class:`kvbench.core.method.Method` registered with
``@register_method``. Drivers find methods through ``kvbench.plugins``.
"""

from __future__ import annotations

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
