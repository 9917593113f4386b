"""FINCH: window attention weighted by query position; kept keys re-rotated.

FINCH (Corallo and Papotti, 2024, "FINCH: Prompt-guided Key-Value Cache Compression", TACL):
SnapKV's attention vote without pooling, each window query's attention row weighted by its
position (``normalize_scores``: the longer a query's row, the more its probabilities are spread),
then the kept keys re-rotated to consecutive positions.

kvpress: ``FinchPress``, whose window is the question, found by a delimiter token between context
and question; kvpress's evaluation refuses FinchPress without query-aware compression. kvbench needs
no delimiter: in a ``--query-aware`` run the runner knows how many tokens follow the context (the
question, and with a chat template the end of the user turn, the assistant header and the answer
prefix, which kvbench compresses with it) and that is the window (``LayerView.question``). A
query-agnostic run has no question, so ``finch`` refuses it; ``finch:window_size=N`` instead takes
the last N tokens as the window (not FINCH's rule; the spec records it). ``chunk_length`` optionally
keeps the same fraction of every chunk; ``rerotate_keys`` re-rotates as ``keyrerotation``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.core.attention import attention_rows, reduce_group
from kvbench.core.budget import Budget
from kvbench.core.method import Method, register_method
from kvbench.core.rerotation import rerotate_kept, rope_frequencies
from kvbench.core.scoring import LayerView


@register_method
@dataclass
class Finch(Method):
    name = "finch"

    window_size: int | None = None  # None: the question (query-aware runs); N: the last N tokens
    chunk_length: int | None = None
    normalize_scores: bool = True
    rerotate_keys: bool = True

    def __post_init__(self) -> None:
        if self.window_size is not None and self.window_size < 1:
            raise ValueError(f"finch window_size must be positive (or none: the question), not {self.window_size}")
        self._window = 0  # the window last scored, for keep_masks (kvpress's press likewise keeps it)

    def setup(self, model, tokenizer=None) -> None:
        if self.rerotate_keys:  # the kept set alone needs no RoPE table
            self._inv_freq = rope_frequencies(model, self.name)

    @property
    def reads_question(self) -> bool:
        return self.window_size is None

    def hidden_window(self) -> int:
        return self.window_size or 0  # the question's length is added where it is known

    def protected_recent(self, seen: int, budget: int, decoding: bool = False) -> int:
        # a question window is kept by its score (max + 1, as kvpress), like any other window inside the budget
        return 0 if self.window_size is None else min(self.window_size, seen)

    def score(self, view: LayerView) -> torch.Tensor:
        total = view.keys.shape[2]
        window = min(self.window_size or view.question, total)
        if window < 1:
            raise ValueError("finch's window is the question: score it in a query-aware unit or set window_size")
        self._window = window
        probs = attention_rows(view.last_queries(window), view.keys, view.scaling, total - window)
        probs = probs[..., : total - window]
        if self.normalize_scores:
            rows = torch.arange(total - window, total, device=probs.device, dtype=probs.dtype)
            probs = probs * rows[None, None, :, None]
        scores = reduce_group(probs.mean(dim=2), view.num_kv_heads, "mean")
        return torch.cat([scores, scores.new_full((*scores.shape[:2], window), float(scores.max()) + 1)], dim=-1)

    def keep_masks(self, scores: list[torch.Tensor], seen: int, budget: Budget) -> list[torch.Tensor]:
        ratio = budget.ratio
        if self.chunk_length is None:
            return super().keep_masks(scores, seen, budget)
        if self.chunk_length <= self._window / (1 - ratio):
            raise ValueError("finch chunk_length must exceed window_size / (1 - ratio)")
        masks = []
        for s in scores:  # the same fraction of every chunk, as kvpress (floored, at least one)
            mask = torch.zeros_like(s, dtype=torch.bool)
            for start in range(0, s.shape[-1], self.chunk_length):
                chunk = s[..., start : start + self.chunk_length]
                count = max(1, int(chunk.shape[-1] * (1 - ratio)))
                mask.scatter_(-1, start + chunk.topk(count, dim=-1).indices, True)
            masks.append(mask)
        return masks

    def after_eviction(self, cache, masks: list[torch.Tensor], seen: int) -> None:
        if self.rerotate_keys:
            rerotate_kept(cache, masks, seen, self._inv_freq)
