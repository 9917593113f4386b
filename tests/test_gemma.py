"""The real Gemma 3 270M base model (``gemma3-270m``: four part wheels reassembled, converted once).

kvbench's engine does not drive Gemma 3 yet (its sliding-window layers), so these tests use
transformers directly on the converted folder: the facts the engine will rely on, and that the base
model answers RULER's base-template prompt as kvbench builds it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvbench.models import resolve_model_path
from kvbench.core.prompts import split_prompt
from kvbench.plugins import get_task

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma():
    path = Path(resolve_model_path("gemma3-270m"))  # downloads and converts on first use (~2 min)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return path, model, tokenizer


def test_gemma3_270m_config_facts(gemma):
    path, model, tokenizer = gemma
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and cfg.model_type == "gemma3_text"
    assert cfg.num_hidden_layers == 18
    assert [i for i, kind in enumerate(cfg.layer_types) if kind == "full_attention"] == [5, 11, 17]
    assert {cfg.layer_types[i] for i in range(18) if i not in (5, 11, 17)} == {"sliding_attention"}
    assert cfg.sliding_window == 512
    shape = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size)
    assert shape == (4, 1, 256, 640)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.query_pre_attn_scalar) == (262144, 32768, 256)
    thetas = {kind: p["rope_theta"] for kind, p in cfg.rope_parameters.items()}
    assert thetas == {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
    ids = tokenizer.convert_tokens_to_ids(["<eos>", "<end_of_turn>"])
    assert model.generation_config.eos_token_id == ids == [1, 106]
    assert tokenizer.chat_template is None and tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    with safe_open(path / "model.safetensors", "pt") as weights:
        assert weights.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    assert "Gemma Terms of Use" in (path / "GEMMA_TERMS.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("index", [0, 1])
def test_gemma3_270m_finds_a_ruler_passkey_in_a_noise_haystack(gemma, index):
    """RULER niah_single_1 at 1K tokens in RULER's base template, answered by transformers' generate."""
    _, model, tokenizer = gemma
    sample = get_task("ruler").sample("niah_single_1", index, tokenizer, 1024, seed=0)
    q = sample.questions[0]
    parts = split_prompt(tokenizer, sample.context, sample.chat_template)
    ids = parts.context_ids + parts.question_ids(tokenizer, q.text, q.answer_prefix)
    # cutting the prompt at the question costs no token: the same ids as RULER's one-piece prompt
    assert ids == tokenizer(sample.context + q.text + q.answer_prefix)["input_ids"]
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    assert q.references[0] in answer, answer
