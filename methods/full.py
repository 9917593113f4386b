"""The full cache: nothing is evicted. Every sweep's baseline, and the reference for token match."""

from dataclasses import dataclass

from kvbench.core.method import Method, register_method


@register_method
@dataclass
class Full(Method):
    name = "full"
    evicts = False
