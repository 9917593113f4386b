"""A name → class registry that refuses to overwrite: two methods (or tasks) called the same are an
error at import time, not a silent swap of one for the other."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes registered under their ``name`` attribute; :meth:`register` is the class decorator."""

    def __init__(self, kind: str):
        self.kind = kind  # "method" or "task", for messages
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        name = getattr(cls, "name", "")
        if not name:
            raise ValueError(f"{cls.__module__}.{cls.__qualname__} needs a name to be registered as a {self.kind}")
        held = self._classes.get(name)
        if held is not None and _origin(held) != _origin(cls):
            raise ValueError(f"two {self.kind}s are called {name!r}: {_origin(held)} and {_origin(cls)}")
        self._classes[name] = cls  # the same class again (a module reloaded) replaces itself
        return cls

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def __getitem__(self, name: str) -> type[T]:
        try:
            return self._classes[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._classes)

    def items(self) -> list[tuple[str, type[T]]]:
        return sorted(self._classes.items())


def _origin(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
