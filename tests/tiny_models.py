"""Tiny models of every supported family (GQA) with a byte-level BPE tokenizer, built offline from configs.

Llama, Qwen2, Qwen3, Mistral, Phi-3 (one fused ``qkv_proj``) and Gemma 3 (alternating sliding-window
and global layers with their own RoPE bases, q/k norms, ``query_pre_attn_scalar`` scaling).

Weights are random but seeded, so greedy outputs are deterministic; what the tests compare is the
engine against references computed another way, never against fixed strings.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3")
GEMMA3_WINDOW = 16  # the tiny Gemma 3's sliding window: contexts in the tests are longer

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 384


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE: every string encodes, and words take a few tokens each."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [string.ascii_letters + string.digits + string.punctuation] * 4 + [
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
        "One of the special magic numbers for the key is: 1234567. What are all the special magic numbers?",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    wrapped.chat_template = CHATML
    return wrapped


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A 2-layer GQA model (4 query heads, 2 KV heads) in float32; Gemma 3 has 4 layers (sliding,
    global, sliding, global) with a window of ``GEMMA3_WINDOW`` tokens."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        eos_token_id=2, bos_token_id=0, tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "gemma3":
        common = {"num_hidden_layers": 3, "sliding_window": GEMMA3_WINDOW, "query_pre_attn_scalar": 64,
                  "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                  "pad_token_id": 0, **common}
        common["num_hidden_layers"] = len(common["layer_types"])
    elif arch == "mistral":
        common = {"sliding_window": None, **common}  # as Mistral 7B v0.2 onwards: full attention
    elif arch == "phi3":
        common = {"pad_token_id": 0, **common}
    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
        "phi3": (Phi3Config, Phi3ForCausalLM), "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    }
    if arch not in classes:
        raise ValueError(arch)
    config_class, model_class = classes[arch]
    model = model_class(config_class(**common))
    # Random init gives near-uniform attention; larger q/k weights make attention peaky, so eviction
    # visibly changes outputs.
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if arch == "gemma3":  # q/k norms after the projections: scale them ((1 + w) x)
                attn.q_norm.weight.fill_(3.0)
                attn.k_norm.weight.fill_(3.0)
            elif hasattr(attn, "qkv_proj"):  # Phi-3: query and key rows of the fused projection
                q_and_k = (model.config.num_attention_heads + model.config.num_key_value_heads) * attn.head_dim
                attn.qkv_proj.weight[:q_and_k].mul_(4.0)
            else:
                attn.q_proj.weight.mul_(4.0)
                attn.k_proj.weight.mul_(4.0)
    return model.eval()


def save_tiny(path: Path, arch: str = "llama", **overrides) -> Path:
    """Write a loadable model folder (config, safetensors, tokenizer with chat template)."""
    model = tiny_model(arch, **overrides)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def prefill_and_score(model, ids, method, chunk=7):
    """Prefill ``ids`` through the pipeline (``Session``) and let ``method`` score it.

    Returns the cache, the per-layer scores and a recorder of every layer's attention inputs (for
    references computed another way; the pipeline itself records only what the method reads).
    """
    from kvbench.core import engine
    from kvbench.core.scoring import HiddenRecorder
    from kvbench.core.session import Session

    session = Session(model, prefill_chunk=chunk)
    with HiddenRecorder(engine.attention_modules(model), None) as recorder:
        prefill = session.prefill(ids, [method])
    return prefill.cache, session.score(prefill, method).scores, recorder
