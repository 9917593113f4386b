"""The real Gemma 3 270M base model (``gemma3-270m``: four part wheels reassembled, converted once).

The facts the engine relies on (layer types, window, RoPE bases, scaling), that the base model
answers RULER's base-template prompt as kvbench builds it, and that kvbench's pipeline with the full
cache generates what transformers' own ``generate`` does, token for token, on prompts shorter and
longer than the 512-token sliding window.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvbench.core import attention
from kvbench.core.budget import Budget, kept_count
from kvbench.core.prompts import split_prompt
from kvbench.core.session import Session
from kvbench.models import resolve_model_path
from kvbench.plugins import get_method, get_task

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


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    # about 900 tokens: longer than the sliding window, so the local layers drop what they no longer see
    " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7 % 31} marbles." for i in range(60))
    + " The box that holds the most marbles is",
]


@pytest.fixture(scope="module")
def gemma_fp32():
    """float32, so kvbench's attention and transformers' SDPA agree beyond any bfloat16 rounding tie."""
    path = Path(resolve_model_path("gemma3-270m"))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_gemma3_270m_full_cache_generation_equals_transformers(gemma_fp32, index):
    model, tokenizer = gemma_fp32
    ids = tokenizer(PROMPTS[index], return_tensors="pt")["input_ids"]
    new = 16
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    expected = out[0, ids.shape[1]:].tolist()

    attention.install(model)
    try:
        session = Session(model, prefill_chunk=256)  # chunks cross the window: the local layers are trimmed between
        context, question = ids[:, :-3], ids[0, -3:].tolist()
        prefill = session.prefill(context)
        compressed = session.full(prefill, get_method("full"))
        windows = [getattr(layer, "window", None) for layer in prefill.cache.layers]
        assert windows == [None if i in (5, 11, 17) else 512 for i in range(18)]
        held = [layer.length for layer in prefill.cache.layers]
        assert held == [context.shape[1] if w is None else min(context.shape[1], 511) for w in windows]
        answer = session.answer(compressed, question, new)
    finally:
        model.set_attn_implementation("sdpa")
    assert answer.tokens == expected
    assert ids.shape[1] > 512 or index < 2


def test_gemma3_270m_snapkv_compresses_only_the_global_layers(gemma_fp32):
    model, tokenizer = gemma_fp32
    ids = tokenizer(PROMPTS[2], return_tensors="pt")["input_ids"]
    attention.install(model)
    try:
        session = Session(model, prefill_chunk=512)
        method = get_method("snapkv")
        prefill = session.prefill(ids, [method])
        compressed = session.cut(prefill, session.score(prefill, method), Budget(0.5, method.allocation))
    finally:
        model.set_attn_implementation("sdpa")
    tokens = ids.shape[1]
    lengths = [layer.length for layer in compressed.cache.layers]
    kept = kept_count(tokens, 0.5)
    assert lengths == [kept if i in (5, 11, 17) else 511 for i in range(18)]
    assert compressed.eviction.measured_ratio == pytest.approx(1 - kept / tokens)  # over the global layers only


@pytest.mark.parametrize("name", ["gated", "kvzap"])
def test_gemma3_270m_ships_learned_weights_for_its_global_layers(gemma, name):
    """The shipped gates and surrogates load for the real model, hold layers 5, 11 and 17 only, and
    score every entry of those layers (the sliding-window layers are never scored)."""
    _, model, tokenizer = gemma
    method = get_method(name)
    method.setup(model, tokenizer)
    modules = method.gates(model.config) if name == "gated" else method.surrogate(model.config).layer_indices
    held = [i for i, gate in enumerate(modules) if gate is not None] if name == "gated" else modules
    assert held == [5, 11, 17]
    ids = tokenizer("The grass is green. " * 200, return_tensors="pt")["input_ids"]
    attention.install(model)
    try:
        session = Session(model, prefill_chunk=512)
        prefill = session.prefill(ids, [method])
        scores = session.score(prefill, method).scores
    finally:
        model.set_attn_implementation("sdpa")
    assert [i for i, s in enumerate(scores) if s.abs().sum() > 0] == [5, 11, 17]  # sliding layers: zeros
    assert all(scores[i].shape[-1] == ids.shape[1] and torch.isfinite(scores[i]).any() for i in (5, 11, 17))
