"""KV-Direct against references computed another way: transformers' own generate, the full cache's
K/V, and byte counts worked out by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from kvbench.core import attention, engine
from kvbench.plugins import get_method
from kvbench.methods.kvdirect import ResidualCache
from tiny_models import tiny_model

ARCHS = ["llama", "qwen3"]
CONTEXT, QUESTION, NEW = 90, 6, 16


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(3, 300, (1, CONTEXT), generator=generator),
            torch.randint(3, 300, (1, QUESTION), generator=generator))


def kvbench_model(arch: str):
    model = tiny_model(arch)
    model.generation_config.eos_token_id = None  # decode the full length on both sides
    reference = copy.deepcopy(model)
    attention.install(model)
    return model, reference


def kvdirect_cache(model, context: torch.Tensor, ratio: float, chunk: int = 7) -> ResidualCache:
    """Prefill in small chunks, so the window already slides during prefill."""
    cache = get_method("kvdirect").new_cache(model, context.shape[1], ratio)
    engine.prefill(model, cache, context, 0, chunk)
    return cache


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_greedy_answer_equals_the_full_cache_token_for_token(arch, ratio):
    model, reference = kvbench_model(arch)
    context, question = inputs()
    out = reference.generate(torch.cat([context, question], dim=1), max_new_tokens=NEW, do_sample=False,
                             past_key_values=DynamicCache(), pad_token_id=0)
    expected = out[0, CONTEXT + QUESTION:].tolist()

    cache = kvdirect_cache(model, context, ratio)
    window = CONTEXT - round(ratio * CONTEXT)
    assert all(layer.keys.shape[2] == window and layer.checkpointed == CONTEXT - window for layer in cache.layers)
    first = engine.forward(model, cache, question, CONTEXT)
    tokens = engine.greedy(model, cache, first, CONTEXT + QUESTION, NEW, eos_ids=set())
    assert tokens == expected
    # question and answer tokens entered the window; as many older ones left it
    assert all(layer.keys.shape[2] == window for layer in cache.layers)
    assert cache.layers[0].checkpointed == CONTEXT + QUESTION + NEW - 1 - window


@pytest.mark.parametrize("arch", ARCHS)
def test_recomputed_keys_and_values_match_the_cached_ones(arch):
    model, _ = kvbench_model(arch)
    context, _ = inputs()
    full = engine.new_cache(model)
    engine.prefill(model, full, context, 0, 7)
    cache = kvdirect_cache(model, context, 0.5)
    for layer, reference in zip(cache.layers, full.layers):
        split = layer.checkpointed
        assert split == CONTEXT // 2
        keys, values = layer.recompute()
        torch.testing.assert_close(keys, reference.keys[:, :, :split], atol=1e-5, rtol=0)
        torch.testing.assert_close(values, reference.values[:, :, :split], atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.keys, reference.keys[:, :, split:], atol=1e-5, rtol=0)


def test_bytes_count_live_kv_and_every_residual():
    model, _ = kvbench_model("llama")  # hidden 64; 2 KV heads x 16 dims: K+V = 64 values, as a residual
    context, _ = inputs()
    cache = kvdirect_cache(model, context, 0.9)
    window, layers, fp32 = 9, 2, 4
    assert cache.kept_bytes() == layers * window * 2 * (2 * 16) * fp32
    assert cache.nbytes == cache.kept_bytes() + layers * CONTEXT * 64 * fp32  # residuals of every token
    assert cache.entries() == layers * 2 * window
    # while decoding, one layer's whole K/V (recomputed + live, concatenated) exists on top of the cache
    engine.forward(model, cache, torch.tensor([[5]]), CONTEXT)
    transient = 2 * 2 * (CONTEXT + 1) * 16 * fp32
    assert cache.peak_bytes == cache.nbytes + transient


def test_a_clone_answers_without_touching_the_original():
    model, _ = kvbench_model("qwen3")
    context, question = inputs()
    cache = kvdirect_cache(model, context, 0.5)
    keys = [layer.keys.clone() for layer in cache.layers]
    work = cache.clone()
    engine.greedy(model, work, engine.forward(model, work, question, CONTEXT), CONTEXT + QUESTION, 4, set())
    assert cache.lengths() == [CONTEXT] * 2 and work.lengths() == [CONTEXT + QUESTION + 3] * 2
    assert all(torch.equal(k, layer.keys) for k, layer in zip(keys, cache.layers))
    assert not cache.rollback_restores
    with pytest.raises(ValueError, match="checkpointed"):
        work.rollback([10, 10])


def test_allocation_other_than_uniform_is_refused():
    with pytest.raises(ValueError, match="one live window"):
        get_method("kvdirect", allocation="global")


@pytest.mark.parametrize("extra", [[], ["--evict-during-prefill", "--evict-during-decoding", "--query-aware"]])
def test_sweep_rows_match_the_full_cache_and_show_the_residual_bytes(extra, tmp_path):
    from kvbench.cli import main
    from kvbench.results import read_results
    from tiny_models import save_tiny

    model_dir = save_tiny(tmp_path / "tiny", "qwen3", max_position_embeddings=2048)
    out = tmp_path / "results"
    assert main(["sweep", "--model", str(model_dir), "--methods", "kvdirect,window", "--ratios", "0.5,0.9",
                 "--task", "ruler:niah_single_1", "--length", "512", "--samples", "2", "--out", str(out),
                 "--prefill-chunk", "100", "--dtype", "float32", *extra]) == 0
    frame = read_results(out)
    assert frame["error"].isna().all(), frame["error"].dropna().tolist()
    kvdirect = frame[frame["method"] == "kvdirect"]
    assert len(kvdirect) == 4 and (kvdirect["token_match"] == 1.0).all()
    assert kvdirect["first_divergence"].isna().all() and (kvdirect["new_tokens"] > 0).all()
    full = frame[frame["method"] == "full"].set_index("sample_id")["prediction"]
    assert (kvdirect["prediction"].to_numpy() == full.loc[kvdirect["sample_id"]].to_numpy()).all()
    assert ((kvdirect["measured_ratio"] - kvdirect["target_ratio"]).abs() <= 1 / kvdirect["context_tokens"]).all()
    # tiny Qwen3: a residual (64 values) is as large as a token's K/V (2 x 2 heads x 16): nothing saved
    residuals = kvdirect["context_tokens"] * 2 * 64 * 4  # 2 layers, float32
    assert (kvdirect["kv_bytes_physical"] == kvdirect["kv_bytes_kept"] + residuals).all()
    assert (kvdirect["kv_bytes_physical"] > kvdirect["kv_bytes_full"]).all()
    assert (kvdirect["scoring_s"] == 0).all()
