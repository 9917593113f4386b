"""Prompt forms: the chat-template prefix is measured, thinking templates are rendered with thinking off."""

from __future__ import annotations

from kvbench.core.prompts import render_chat, split_prompt, template_prefix_length
from tiny_models import tiny_tokenizer

SYSTEM = "You are a careful reader."
# Qwen3's switch, reduced to what matters: a default system turn (as Qwen2.5's template writes one),
# and an empty think block after the assistant header when enable_thinking is false
QWEN3_STYLE = (
    "{{- '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}"
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def qwen3_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = QWEN3_STYLE
    return tokenizer


def test_a_thinking_template_is_rendered_with_thinking_off():
    tokenizer = qwen3_tokenizer()
    parts = split_prompt(tokenizer, "The grass is green.", chat_template=True)
    ids = parts.context_ids + parts.question_ids(tokenizer, " What colour?", "Answer:")
    written = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nThe grass is green. What colour?"
               "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nAnswer:")
    assert tokenizer.decode(ids) == written
    # the switch is the template's own: rendered without it, the answer would open a think block
    assert "<think>" not in tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                          add_generation_prompt=True)


def test_a_template_without_the_switch_is_rendered_as_it_is():
    tokenizer = tiny_tokenizer()  # ChatML, no enable_thinking
    messages = [{"role": "user", "content": "Hello"}]
    assert render_chat(tokenizer, messages, add_generation_prompt=True) == \
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_the_template_prefix_is_counted_in_tokens():
    tokenizer = qwen3_tokenizer()
    parts = split_prompt(tokenizer, "The grass is green.", chat_template=True)
    header = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
    by_hand = len(tokenizer.encode(header, add_special_tokens=False))
    assert by_hand > 4  # longer than the sinks: protecting it matters
    assert parts.prefix_tokens == by_hand
    assert tokenizer.decode(parts.context_ids[:by_hand]) == header
    assert template_prefix_length(tokenizer, parts.context_ids) == by_hand
    # a prompt formatted some other way has no known prefix
    assert template_prefix_length(tokenizer, tokenizer.encode("The grass is green.")) == 0


def test_plain_prompts_have_no_template_prefix():
    tokenizer = tiny_tokenizer()
    assert split_prompt(tokenizer, "The grass is green.", chat_template=False).prefix_tokens == 0
    tokenizer.chat_template = None
    assert split_prompt(tokenizer, "The grass is green.", chat_template=True).prefix_tokens == 0
