"""Splitting a chat-formatted prompt into the part that is compressed and the part that is not.

The context is prefilled (and compressed) before the question is seen, so the prompt is cut at the
end of the context: everything the chat template puts before it (system prompt, user header) goes
with the context; the question, the template's end-of-turn and assistant header, and the task's
answer prefix come after.

The template's own text before the context (its *prefix*) is not the user's content: KVzip keeps
it outside the compressed span, and kvbench protects it from eviction as it protects the sinks
(:class:`Layout`). Templates that can think before answering (Qwen3's ``enable_thinking``) are
rendered with thinking off, as kvpress's pipeline does, so answers start with the answer.

The chat form needs both the task's request and a chat template on the tokenizer. A base model has
none (kvbench's base-model aliases drop any the GGUF carries), so it gets the plain form: the context
with the tokenizer's own special tokens (BOS), then question and answer prefix, as RULER's ``base``
template and LongBench's non-chat prompts are fed.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

_MARK = "\u2063KVBENCH-CUT\u2063"  # an invisible separator no task text contains


@dataclass(frozen=True)
class Layout:
    """Where a prefilled unit's parts lie, in tokens: ``prefix`` template tokens at the front
    (protected like the sinks) and, in a query-aware unit, ``question`` tokens at the end (the
    question, the template's end of turn and the answer prefix: what FINCH reads as its window)."""

    prefix: int = 0
    question: int = 0


@dataclass
class PromptParts:
    context_ids: list[int]
    suffix: str  # what follows the question: end of the user turn and the assistant header
    prefix_tokens: int = 0  # how many of context_ids the chat template wrote before the context

    def question_ids(self, tokenizer: PreTrainedTokenizerBase, question: str, answer_prefix: str) -> list[int]:
        return tokenizer.encode(question + self.suffix + answer_prefix, add_special_tokens=False)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **kwargs) -> str:
    """The chat template's text for ``messages``, with thinking off where the template has the switch
    (Qwen3's ``enable_thinking``: its empty think block then precedes the answer, as the model card
    prescribes for non-thinking use)."""
    if "enable_thinking" in (tokenizer.chat_template or ""):
        kwargs.setdefault("enable_thinking", False)
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def split_prompt(tokenizer: PreTrainedTokenizerBase, context: str, chat_template: bool) -> PromptParts:
    """Token ids of the context part, and the template text that closes the user turn."""
    if not (chat_template and tokenizer.chat_template):
        return PromptParts(tokenizer.encode(context, add_special_tokens=True), "")
    before, after = _around_content(tokenizer, context)
    ids = tokenizer.encode(before, add_special_tokens=False)
    return PromptParts(ids, after, template_prefix_length(tokenizer, ids))


def _around_content(tokenizer: PreTrainedTokenizerBase, content: str) -> tuple[str, str]:
    rendered = render_chat(tokenizer, [{"role": "user", "content": content + _MARK}], add_generation_prompt=True)
    before, after = rendered.split(_MARK)
    return before, after


def template_prefix_length(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> int:
    """How many of ``ids`` are the chat template's prefix (system prompt, user header): the tokens the
    template writes before a user turn's content, when ``ids`` starts with them; 0 otherwise (plain
    prompts, or prompts formatted some other way)."""
    if not tokenizer.chat_template:
        return 0
    prefix = tokenizer.encode(_around_content(tokenizer, "")[0], add_special_tokens=False)
    common = 0
    for a, b in zip(prefix, ids):
        if a != b:
            break
        common += 1
    # the prefix's last token may merge with the content's first one
    return common if prefix and common >= len(prefix) - 1 else 0
