"""kvbench's methods against NVIDIA kvpress 0.5.5's presses, on tensors kvpress itself scored.

The fixture (``tests/fixtures/kvpress``, made by ``generate.py`` there in a separate kvpress
environment) holds a tiny random Llama, the inputs each press received per layer (attention inputs,
rotary tables, cached keys and values) and what each press returned: scores and kept positions at
ratio 0.5. Here the same model is rebuilt under kvbench's transformers, each kvbench method scores
the same tensors through a :class:`LayerView`, and the engine evicts. Scores must agree to 1e-5 and
kept sets exactly. kvbench always keeps 4 sink tokens (kvpress does not), so each comparison runs
with ``sinks=0``, and a second check shows that with the default sinks the kept set differs only by
them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from kvbench.core import engine
from kvbench.core.budget import Budget
from kvbench.core.budget import kept_count
from kvbench.core.cache import EvictableCache
from kvbench.core.method import Method
from kvbench.plugins import get_method
from kvbench.core.scoring import LayerView

FIXTURE = Path(__file__).parent / "fixtures" / "kvpress"
META = json.loads((FIXTURE / "kvpress_fixture.json").read_text())
TOKENS, RATIO = META["tokens"], META["ratio"]
LAYERS = META["config"]["num_hidden_layers"]
SEED = META["layer_seeds"][0]  # kvpress seeded torch with layer_seeds[i] = SEED + i before layer i


@functools.cache
def tensors() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "kvpress_fixture.safetensors")


@functools.cache
def model() -> LlamaForCausalLM:
    """The fixture's model, rebuilt from its config and weights."""
    rebuilt = LlamaForCausalLM(LlamaConfig(**META["config"]))
    weights = {k.removeprefix("model."): v for k, v in tensors().items() if k.startswith("model.")}
    rebuilt.load_state_dict(weights)
    return rebuilt.eval()


def view(layer: int, ratio: float | None = None, question: int = 0) -> LayerView:
    t = tensors()
    return LayerView(layer_idx=layer, attn=model().model.layers[layer].self_attn, keys=t[f"layer{layer}.keys"],
                     values=t[f"layer{layer}.values"], hidden=t[f"layer{layer}.hidden"], cos=t[f"layer{layer}.cos"],
                     sin=t[f"layer{layer}.sin"], ratio=ratio, rotary=model().model.rotary_emb, question=question)


def scores_of(method: Method, question: int = 0) -> list[torch.Tensor]:
    ratio = RATIO if method.ratio_dependent() else None
    with torch.no_grad():
        return [method.score(view(layer, ratio, question)).float() for layer in range(LAYERS)]


def evict(method: Method, ratio: float = RATIO, question: int = 0) -> tuple[list[list[list[int]]], EvictableCache]:
    """Evict a cache holding the fixture's keys and values with the engine; the kept positions
    per layer and KV head, and the cache."""
    cache = EvictableCache(LAYERS)
    for layer in range(LAYERS):
        keys, values = tensors()[f"layer{layer}.keys"].clone(), tensors()[f"layer{layer}.values"].clone()
        cache.update(keys, values, layer)
        cache.layers[layer].state["test.position"] = torch.arange(TOKENS).float().expand(keys.shape[:3]).clone()
    method.setup(model())
    with torch.no_grad():
        budget = Budget(None if method.threshold_mode else ratio, method.allocation)
        engine.evict(cache, scores_of(method, question), method, budget, seen=TOKENS)
    kept = []
    for layer in cache.layers:
        positions = layer.state["test.position"][0]
        valid = torch.ones_like(positions, dtype=torch.bool) if layer.valid is None else layer.valid[0]
        kept.append([sorted(positions[h][valid[h]].long().tolist()) for h in range(positions.shape[0])])
    return kept, cache


def kvpress_scores(name: str) -> list[torch.Tensor]:
    return [tensors()[f"{name}.layer{layer}.scores"] for layer in range(LAYERS)]


def kvpress_kept(name: str) -> list[list[list[int]]]:
    out = []
    for layer in range(LAYERS):
        if f"{name}.layer{layer}.kept_mask" in tensors():
            mask = tensors()[f"{name}.layer{layer}.kept_mask"][0]
            out.append([mask[h].nonzero().flatten().tolist() for h in range(mask.shape[0])])
        else:
            out.append(tensors()[f"{name}.layer{layer}.kept"][0].tolist())
    return out


def with_sinks(scores: list[torch.Tensor], kept: int, sinks: int = 4) -> list[list[list[int]]]:
    """What kvpress would keep if it also always kept the first ``sinks`` tokens: the sinks plus the
    best ``kept - sinks`` of the other entries by kvpress's own scores."""
    out = []
    for s in scores:
        rest = s[0, :, sinks:]
        out.append([sorted(list(range(sinks)) + (rest[h].topk(kept - sinks).indices + sinks).tolist())
                    for h in range(rest.shape[0])])
    return out


def assert_scores_equal(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    for layer, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5, msg=lambda m: f"layer {layer}: {m}")


def snap(**extra):
    return get_method("snapkv", window_size=16, kernel_size=5, **extra)


# fixture press -> the kvbench method with kvpress's arguments (sinks=0 added by the tests)
SCORERS = {
    "snapkv": lambda **o: snap(**o),
    "knorm": lambda **o: get_method("knorm", **o),
    "keydiff": lambda **o: get_method("keydiff", **o),
    "tova": lambda **o: get_method("tova", **o),
    "expected_attention": lambda **o: get_method("expected_attention", **o),
    "expected_attention_nocov": lambda **o: get_method("expected_attention", use_covariance=False, epsilon=0.01, **o),
    "lagkv": lambda **o: get_method("lagkv", lag_size=16, **o),
    "cur": lambda **o: get_method("cur", **o),
    "leverage": lambda **o: get_method("leverage", seed=SEED, **o),
    "non_causal_attention": lambda **o: get_method("non_causal_attention", chunk_size=32, **o),
    "compactor": lambda **o: get_method("compactor", chunk_size=32, seed=SEED, **o),
    "finch": lambda **o: get_method("finch", window_size=16, **o),
    "criticalkv_snapkv": lambda **o: get_method("criticalkv", base=snap(), **o),
    "cap": lambda **o: get_method("cap", **o),
}


def test_fixture_model_rebuilds_the_press_inputs():
    """The rebuilt model's rotary tables and projections reproduce what kvpress's model produced."""
    t = tensors()
    positions = torch.arange(TOKENS).unsqueeze(0)
    cos, sin = model().model.rotary_emb(t["layer0.hidden"], positions)
    torch.testing.assert_close(cos, t["layer0.cos"])
    torch.testing.assert_close(sin, t["layer0.sin"])
    from kvbench.core.attention import project_keys_values

    for layer in range(LAYERS):
        keys, values = project_keys_values(model().model.layers[layer].self_attn, t[f"layer{layer}.hidden"],
                                           t[f"layer{layer}.cos"], t[f"layer{layer}.sin"])
        torch.testing.assert_close(keys, t[f"layer{layer}.keys"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values, t[f"layer{layer}.values"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scores_and_kept_set_equal_kvpress(name):
    method = SCORERS[name](sinks=0)
    assert_scores_equal(scores_of(method), kvpress_scores(name))
    kept, _ = evict(method)
    assert kept == kvpress_kept(name)


@pytest.mark.parametrize("name", sorted(set(SCORERS) - {"criticalkv_snapkv"}))
def test_default_sinks_are_the_only_difference(name):
    kept, _ = evict(SCORERS[name]())
    expected = with_sinks(kvpress_scores(name), kept_count(TOKENS, RATIO))
    assert kept == expected
    for ours, theirs in zip((h for layer in kept for h in layer), (h for layer in kvpress_kept(name) for h in layer)):
        added, dropped = set(ours) - set(theirs), set(theirs) - set(ours)
        assert added <= set(range(4)) and len(added) == len(dropped)  # sinks in, as many others out


def test_window_keeps_what_streaming_llm_keeps():
    """StreamingLLM: kvpress scores 0/1 for the evicted middle at one ratio; kvbench scores recency
    (one scoring serves every ratio). Same 4 sinks, same kept set."""
    kept, _ = evict(get_method("window"))
    assert kept == kvpress_kept("streaming_llm")


def test_h2o_without_recent_window_equals_observed_attention():
    """kvpress's ObservedAttentionPress (mean attention received, from eager attention weights) is
    H2O's heavy-hitter score divided by how many queries saw each key: kvbench's h2o with
    ``normalize=True`` and no recent half rebuilds it from the attention inputs. The paper's raw sums
    (h2o's default) favour early keys, and choose another set here."""
    method = get_method("h2o", recent_fraction=0.0, sinks=0, normalize=True)
    assert_scores_equal(scores_of(method), kvpress_scores("observed_attention"))
    kept, _ = evict(method)
    assert kept == kvpress_kept("observed_attention")
    paper, _ = evict(get_method("h2o", recent_fraction=0.0, sinks=0))
    assert paper != kept


def test_pyramidkv_layer_budgets_and_kept_sets_equal_kvpress():
    method = get_method("pyramidkv", window_size=16, kernel_size=5, beta=20, sinks=0)
    kept, _ = evict(method)
    assert kept == kvpress_kept("pyramidkv")
    assert [len(layer[0]) for layer in kept] == [80, 48, 16]  # the pyramid, worked by hand


def test_simlayerkv_lazy_layers_equal_kvpress():
    args = META["presses"]["simlayerkv"]["args"]
    method = get_method("simlayerkv", threshold=args["lazy_threshold"], n_last=args["n_last"],
                        n_recent=args["n_recent"], n_initial=args["n_initial"])
    masses = [method.lazy_mass(view(layer)) for layer in range(LAYERS)]
    assert masses == pytest.approx(META["presses"]["simlayerkv"]["lazy_mass"], abs=1e-5)
    kept, _ = evict(method)  # threshold mode: the budget has no ratio
    assert kept == kvpress_kept("simlayerkv")
    assert sorted({len(layer[0]) for layer in kept}) == [4 + 31, TOKENS]  # some layers lazy, some not


def test_adakv_head_budgets_equal_kvpress():
    method = get_method("adakv", base=snap(), alpha_safeguard=0.2, sinks=0)
    kept, cache = evict(method)
    assert kept == kvpress_kept("adakv_snapkv")
    assert any(len(set(map(len, layer))) > 1 for layer in kept)  # heads did get different budgets


def test_criticaladakv_head_budgets_equal_kvpress():
    method = get_method("criticaladakv", base=snap(), sinks=0)
    kept, _ = evict(method)
    assert kept == kvpress_kept("criticaladakv_snapkv")
    assert any(len(set(map(len, layer))) > 1 for layer in kept)
    plain, _ = evict(get_method("adakv", base=snap(), sinks=0))
    assert kept != plain  # the value-norm stage changed the choice


@pytest.mark.parametrize("name, base", [("chunkkv_snapkv", snap), ("chunkkv_knorm", lambda **o: get_method("knorm", **o))])
def test_chunkkv_kept_chunks_equal_kvpress(name, base):
    kept, _ = evict(get_method("chunkkv", base=base(), chunk_length=20, sinks=0))
    assert kept == kvpress_kept(name)


def test_chunkkv_with_sinks_keeps_the_sink_chunk_first():
    """With the default sinks, the first chunk scores +inf and is kept; the rest follow kvpress's ranking."""
    kept, _ = evict(get_method("chunkkv", base=get_method("knorm"), chunk_length=20))
    for layer, theirs in zip(kept, kvpress_kept("chunkkv_knorm")):
        ours = set(layer[0])
        assert set(range(20)) <= ours
        assert len(ours) == len(theirs[0])  # as many chunks
        assert len(ours - set(theirs[0])) <= 20  # at most the sink chunk replaced another one


def test_keyrerotation_moves_kept_keys_as_kvpress():
    method = get_method("keyrerotation", base=get_method("knorm", sinks=0), sinks=0)
    kept, cache = evict(method)
    assert kept == kvpress_kept("keyrerotation_knorm")
    for layer in range(LAYERS):
        torch.testing.assert_close(cache.layers[layer].keys, tensors()[f"keyrerotation_knorm.layer{layer}.new_keys"],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window, question", [(None, 16), (16, 0)])
def test_finch_rerotated_keys_equal_kvpress(window, question):
    """kvpress's window is the question after its delimiter (the fixture's last 16 tokens): kvbench's
    finch takes the question's length from a query-aware unit, or ``window_size`` tokens when set."""
    method = get_method("finch", window_size=window, sinks=0)
    assert_scores_equal(scores_of(method, question), kvpress_scores("finch"))
    kept, cache = evict(method, question=question)
    assert kept == kvpress_kept("finch")
    for layer in range(LAYERS):
        torch.testing.assert_close(cache.layers[layer].keys, tensors()[f"finch.layer{layer}.new_keys"],
                                   rtol=1e-5, atol=1e-5)


def test_wrapper_config_names_its_base():
    config = get_method("chunkkv", base=snap(), chunk_length=10).config()
    assert config["chunk_length"] == 10
    assert config["base"] == {"name": "snapkv", **snap().config()}
