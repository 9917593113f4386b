"""Key re-rotation: a base method's eviction, then the kept keys re-rotated to consecutive positions.

Key re-rotation: after the base method's eviction, re-rotate the kept keys to consecutive
positions ``0..kept-1`` (the RoPE layout of a cache that never held the evicted tokens), as
StreamingLLM's rolling cache, transformers' former ``SinkCache`` and FINCH do.

kvpress: ``KeyRerotationPress`` (a wrapper around any scorer). kvbench otherwise keeps every key at
its original position's phase; here, as in kvpress's pipeline, the tokens that follow the context
(question, answer) still take their original positions, so re-rotation opens a gap between the
context and the question. It applies to the first eviction of a whole context only (kvbench does
not track positions across repeated evictions), so it does not evict during prefill or decoding.
"""

from dataclasses import dataclass

import torch

from kvbench.core.budget import Budget
from kvbench.core.method import Wrapper, register_method
from kvbench.core.rerotation import rerotate_kept, rope_frequencies


@register_method
@dataclass
class KeyRerotation(Wrapper):
    name = "keyrerotation"
    incremental = False  # re-rotation needs the whole context's positions: first eviction only
    default_base = "window"

    def setup(self, model, tokenizer=None) -> None:
        super().setup(model, tokenizer)
        self._inv_freq = rope_frequencies(model, self.name)

    def keep_masks(self, scores: list[torch.Tensor], seen: int, budget: Budget) -> list[torch.Tensor]:
        return self.base.keep_masks(scores, seen, budget)

    def after_eviction(self, cache, masks: list[torch.Tensor], seen: int) -> None:
        if not hasattr(self, "_inv_freq"):
            raise RuntimeError("keyrerotation needs setup(model) before eviction (the model's RoPE frequencies)")
        rerotate_kept(cache, masks, seen, self._inv_freq)
