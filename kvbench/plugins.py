"""Finding methods and tasks: kvbench's own and those other packages declare, and method specs.

Built-in methods live in ``kvbench.methods`` and tasks in ``kvbench.tasks``. A third-party package
adds its own by declaring an entry point in the ``kvbench.methods`` or ``kvbench.tasks`` group whose
value is a module (importing it registers its classes) or a class::

    [project.entry-points."kvbench.methods"]
    mymethod = "mypackage.mymethod:MyMethod"

Only drivers (the CLI, the runner, the lm-eval model) look methods and tasks up; the engine core
receives instances.

A **method spec** names a method and sets its fields: ``snapkv``, ``snapkv:window_size=32,kernel_size=7``.
Values are converted to the field's type (int, float, bool, str, or None for ``none``); a field that
holds another method (a wrapper's ``base``) takes a method name, and ``base.window_size=32`` sets the
inner method's fields.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from importlib.metadata import entry_points
from typing import Any

from kvbench.core.method import METHODS, Method
from kvbench.core.task import TASKS, Task

_loaded: set[str] = set()


def _load(group: str, builtin: str) -> None:
    """Import the built-in package and every entry point of ``group``, once per process."""
    if group in _loaded:
        return
    _loaded.add(group)
    importlib.import_module(builtin)
    registry = METHODS if group == "kvbench.methods" else TASKS
    for point in entry_points(group=group):
        try:
            loaded = point.load()
        except Exception as err:  # noqa: BLE001 - a broken plugin is named, not a traceback
            _loaded.discard(group)
            raise ValueError(f"cannot load {group} entry point {point.name!r} ({point.value}): "
                             f"{type(err).__name__}: {err}") from None
        if isinstance(loaded, type):
            registry.register(loaded)


def list_methods() -> list[str]:
    _load("kvbench.methods", "kvbench.methods")
    return METHODS.names()


def method_class(name: str) -> type[Method]:
    _load("kvbench.methods", "kvbench.methods")
    return METHODS[name]


def list_tasks() -> list[str]:
    _load("kvbench.tasks", "kvbench.tasks")
    return TASKS.names()


def get_task(name: str) -> Task:
    _load("kvbench.tasks", "kvbench.tasks")
    return TASKS[name]()


class SpecError(ValueError):
    """A method spec that names no method or sets a field wrongly; the message is one line."""


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"snapkv:window_size=32,kernel_size=7"`` → ``("snapkv", {"window_size": "32", "kernel_size": "7"})``."""
    name, _, options = spec.strip().partition(":")
    pairs: dict[str, str] = {}
    for item in (o.strip() for o in options.split(",")) if options.strip() else []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SpecError(f"method spec {spec!r}: {item!r} is not FIELD=VALUE")
        if key.strip() in pairs:
            raise SpecError(f"method spec {spec!r}: {key.strip()} is set twice")
        pairs[key.strip()] = value.strip()
    if not name.strip():
        raise SpecError(f"method spec {spec!r} names no method")
    return name.strip(), pairs


def get_method(name: str, **options: Any) -> Method:
    """Method ``name`` with typed field values (the Python-side counterpart of :func:`make_method`)."""
    return build_method(name, options)


def make_method(spec: str, **defaults: Any) -> Method:
    """Build a method from a spec; ``defaults`` (already typed, e.g. ``seed``, ``allocation``) apply
    to fields the method has and the spec does not set."""
    name, options = split_spec(spec)
    return build_method(name, options, defaults, spec)


def build_method(name: str, options: dict[str, Any], defaults: dict[str, Any] | None = None,
                 spec: str | None = None) -> Method:
    """Build method ``name`` from string (or already typed) ``options``; nested ``base.x`` keys go to a
    method-typed field's own method."""
    spec = spec or name
    known = list_methods()
    if name not in known:
        raise SpecError(f"unknown method {name!r} (known: {', '.join(known)})")
    cls = METHODS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    nested: dict[str, dict[str, Any]] = {}
    values: dict[str, Any] = {}
    for key, raw in options.items():
        head, dot, rest = key.partition(".")
        if head not in fields:
            raise SpecError(f"method {name!r} has no field {head!r} (in {spec!r}); its fields: "
                            f"{', '.join(sorted(fields))}")
        if dot:
            nested.setdefault(head, {})[rest] = raw
        else:
            values[head] = _convert(raw, hints[head], f"{name}.{head}", spec)
    for head, inner in nested.items():
        base = values.get(head)
        if not isinstance(base, Method):
            raise SpecError(f"method spec {spec!r}: set {head}=METHOD before {head}.FIELD")
        values[head] = build_method(base.name, {**_set_fields(base), **inner}, None, spec)
    for key, value in (defaults or {}).items():
        if key in fields and key not in values and value is not None:
            values[key] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise SpecError(f"method {name!r}: {err}") from None


def _set_fields(method: Method) -> dict[str, Any]:
    """A method's fields as typed values, so that nested options can be layered on top."""
    return {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}


def _convert(raw: Any, hint: Any, field: str, spec: str) -> Any:
    """A spec value as the field's type; already-typed values (from Python callers) pass through."""
    if not isinstance(raw, str):
        return raw
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if raw.lower() in ("none", "null") and type(None) in options:
        return None
    for kind in (o for o in options if o is not type(None)):
        if isinstance(kind, type) and issubclass(kind, Method):
            name, inner = split_spec(raw)
            return build_method(name, inner, None, spec)
        try:
            if kind is bool:
                if raw.lower() in ("true", "1", "yes"):
                    return True
                if raw.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            if kind in (int, float, str):
                return kind(raw)
        except ValueError:
            continue
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise SpecError(f"method spec {spec!r}: {field}={raw!r} is not {names}")
