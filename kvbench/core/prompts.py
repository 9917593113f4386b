"""Splitting a chat-formatted prompt into the part that is compressed and the part that is not.

The context is prefilled (and compressed) before the question is seen, so the prompt is cut at the
end of the context: everything the chat template puts before it (system prompt, user header) goes
with the context; the question, the template's end-of-turn and assistant header, and the task's
answer prefix come after.

The chat form needs both the task's request and a chat template on the tokenizer. A base model has
none (kvbench's base-model aliases drop any the GGUF carries), so it gets the plain form: the context
with the tokenizer's own special tokens (BOS), then question and answer prefix, as RULER's ``base``
template and LongBench's non-chat prompts are fed.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

_MARK = "\u2063KVBENCH-CUT\u2063"  # an invisible separator no task text contains


@dataclass
class PromptParts:
    context_ids: list[int]
    suffix: str  # what follows the question: end of the user turn and the assistant header

    def question_ids(self, tokenizer: PreTrainedTokenizerBase, question: str, answer_prefix: str) -> list[int]:
        return tokenizer.encode(question + self.suffix + answer_prefix, add_special_tokens=False)


def split_prompt(tokenizer: PreTrainedTokenizerBase, context: str, chat_template: bool) -> PromptParts:
    """Token ids of the context part, and the template text that closes the user turn."""
    if not (chat_template and tokenizer.chat_template):
        return PromptParts(tokenizer.encode(context, add_special_tokens=True), "")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + _MARK}], tokenize=False, add_generation_prompt=True
    )
    before, after = rendered.split(_MARK)
    return PromptParts(tokenizer.encode(before, add_special_tokens=False), after)
