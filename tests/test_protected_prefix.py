"""The chat template's prefix is kept like the sinks, by every method but ``random``, whenever it evicts."""

from __future__ import annotations

import pytest
import torch

from kvbench.cli import main
from kvbench.core import attention, engine
from kvbench.core.budget import Budget
from kvbench.core.prompts import Layout
from kvbench.core.session import Session
from kvbench.plugins import make_method
from test_prompts import QWEN3_STYLE, SYSTEM
from tiny_models import save_tiny, tiny_model, tiny_tokenizer

PREFIX, TOKENS, RATIO = 12, 64, 0.75


def kept_positions(cache, full_keys: list[torch.Tensor]) -> list[list[set[int]]]:
    """Per layer and KV head, the positions whose keys the cache still holds (matched to the full
    cache's keys, which are all distinct; pass only layer 0's when eviction during prefill changed
    what later layers computed)."""
    out = []
    for layer, full in zip(cache.layers, full_keys):
        heads = []
        for h in range(full.shape[1]):
            real = layer.keys[0, h] if layer.valid is None else layer.keys[0, h][layer.valid[0, h]]
            same = (real[:, None, :] == full[0, h][None, :, :]).all(-1)  # (kept, T)
            assert bool((same.sum(-1) == 1).all())
            heads.append(set(same.float().argmax(-1).tolist()))
        out.append(heads)
    return out


def compressed_positions(spec: str, layout: Layout, during_prefill: bool = False) -> list[list[set[int]]]:
    model = tiny_model("llama")
    attention.install(model)
    session = Session(model, prefill_chunk=16)
    ids = torch.randint(3, 300, (1, TOKENS), generator=torch.Generator().manual_seed(7))
    full = [layer.keys.clone() for layer in session.prefill(ids).cache.layers]
    full = full[:1] if during_prefill else full  # layer 0's keys depend on the tokens alone
    method = make_method(spec)
    compressed = session.compress(ids, method, Budget(RATIO, method.allocation), during_prefill, layout=layout)
    return kept_positions(compressed.cache, full)


@pytest.mark.parametrize("name, during_prefill", [("knorm", False), ("snapkv:window_size=16", False), ("h2o", True)])
def test_every_head_keeps_the_template_prefix(name, during_prefill):
    kept = compressed_positions(name, Layout(prefix=PREFIX), during_prefill)
    assert all(set(range(PREFIX)) <= head for layer in kept for head in layer)
    # without the prefix only the 4 sinks are protected: this method would evict part of it
    plain = compressed_positions(name, Layout(), during_prefill)
    assert all(set(range(4)) <= head for layer in plain for head in layer)
    assert any(not set(range(PREFIX)) <= head for layer in plain for head in layer)


def test_random_may_evict_the_prefix():
    kept = compressed_positions("random", Layout(prefix=PREFIX))
    assert any(not set(range(PREFIX)) <= head for layer in kept for head in layer)


def test_the_runner_protects_the_prefix_its_template_writes(tmp_path, monkeypatch):
    """A template with a system turn: the prefix (system turn + user header) reaches every eviction."""
    folder = save_tiny(tmp_path / "model", "llama", max_position_embeddings=2048)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = QWEN3_STYLE
    tokenizer.save_pretrained(folder)
    header = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
    prefix = len(tokenizer.encode(header, add_special_tokens=False))
    seen = []
    evict = engine.evict

    def recording(cache, scores, method, budget, seen_tokens, layout=Layout(), decoding=False):
        seen.append((method.name, layout.prefix, decoding))
        return evict(cache, scores, method, budget, seen_tokens, layout, decoding)

    monkeypatch.setattr(engine, "evict", recording)
    assert main(["run", "--method", "window", "--ratio", "0.5", "--model", str(folder), "--task",
                 "ruler:niah_single_1", "--length", "512", "--samples", "1", "--evict-during-decoding",
                 "--decode-interval", "4", "--out", str(tmp_path / "out")]) == 0
    assert seen and all(p == prefix for _, p, _ in seen)
    assert any(decoding for _, _, decoding in seen)  # decode-time evictions protect it too
