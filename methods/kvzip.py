"""KVzip (Kim et al., 2025): keep the entries the model needs to reconstruct its own context.

After the context is prefilled, the model is asked to repeat it, teacher-forced, in chunks of about
2,000 tokens; an entry's score is the largest attention probability any repeat query of any query
head in its GQA group gives it (``kvbench.core.reconstruction``, shared with the training targets
of ``gated`` and ``kvzap``). Scores are probabilities, comparable across layers, so the default
allocation is one global threshold. Costs 2-3x a prefill. ``plus=True`` scores with KVzip+ (KVzap's
target: log, output-weighted) instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.core.method import Method, register_method
from kvbench.core.reconstruction import reconstruction_scores


@register_method
@dataclass
class KVzip(Method):
    name = "kvzip"

    chunk_size: int = 2000  # context tokens reconstructed per forward pass
    quote_tokens: int = 8  # tokens of the previous chunk quoted in a later chunk's prompt
    query_block: int = 256  # repeat queries per block of recomputed attention rows
    plus: bool = False  # score with KVzip+ (log, output-weighted) instead of plain KVzip
    allocation: str = "global"

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.query_block < 1 or self.quote_tokens < 0:
            raise ValueError("kvzip chunk_size and query_block must be positive, quote_tokens >= 0")
        self._tokenizer = None

    def hidden_window(self) -> int:
        return 0  # scores come from the repeat pass, not from prefill inputs

    def score_cache(self, model, cache, context_ids: torch.Tensor) -> list[torch.Tensor]:
        tokenizer = self.tokenizer_for(model)
        kvzip, plus = reconstruction_scores(
            model, cache, context_ids, tokenizer, self.chunk_size, self.quote_tokens, self.query_block,
            plus=self.plus,
        )
        return plus if self.plus else kvzip

    def tokenizer_for(self, model):
        """The repeat prompt is text, so KVzip needs the model's tokenizer (from its folder or hub id)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(model.config.name_or_path)
        return self._tokenizer

    def bind_tokenizer(self, tokenizer) -> "KVzip":
        self._tokenizer = tokenizer
        return self

    def setup(self, model, tokenizer=None) -> None:
        """The runner hands over the tokenizer it loaded (else it is loaded from the model's folder)."""
        if tokenizer is not None:
            self._tokenizer = tokenizer
