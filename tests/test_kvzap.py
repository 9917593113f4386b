"""KVzap surrogates: the published folder format, the method's scores, the paper's threshold rule against a
straight re-implementation, the fixed-ratio variant, missing weights."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kvbench.core import attention, engine
from kvbench.core.budget import Budget
from kvbench.core.prompts import Layout
from kvbench.core.scoring import HiddenRecorder
from kvbench.core.session import Session
from kvbench.plugins import get_method
from kvbench.models import ModelError
from kvbench.methods.kvzap import load_surrogate
from test_protected_prefix import kept_positions
from tiny_models import prefill_and_score, tiny_model

LAYERS, D, H = 2, 64, 2


class Config:
    num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size = LAYERS, 4, H, D
    name_or_path = "org/tiny-kvzap"


def published_folder(path, kind, seed=0):
    """``nvidia/KVzap-{kind}-<model>`` layout: transformers config + model.safetensors of ``layers.*``."""
    g = torch.Generator().manual_seed(seed)
    hidden = None if kind == "linear" else 8
    tensors = {}
    for i in range(LAYERS):
        if kind == "linear":
            tensors[f"layers.{i}.weight"] = torch.randn(H, D, generator=g).to(torch.bfloat16)
            tensors[f"layers.{i}.bias"] = torch.randn(H, generator=g).to(torch.bfloat16)
        else:
            tensors[f"layers.{i}.0.weight"] = torch.randn(hidden, D, generator=g).to(torch.bfloat16)
            tensors[f"layers.{i}.0.bias"] = torch.randn(hidden, generator=g).to(torch.bfloat16)
            tensors[f"layers.{i}.2.weight"] = torch.randn(H, hidden, generator=g).to(torch.bfloat16)
            tensors[f"layers.{i}.2.bias"] = torch.randn(H, generator=g).to(torch.bfloat16)
    path.mkdir(parents=True)
    config = {"architectures": ["KVzapModel"], "model_type": "kvzap", "input_dim": D, "output_dim": H,
              "hidden_dim": hidden, "n_modules": LAYERS, "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return tensors


def by_hand(tensors, kind, layer, x):
    t = {k: v.float() for k, v in tensors.items()}
    if kind == "linear":
        return x @ t[f"layers.{layer}.weight"].T + t[f"layers.{layer}.bias"]
    h = F.gelu(x @ t[f"layers.{layer}.0.weight"].T + t[f"layers.{layer}.0.bias"])
    return h @ t[f"layers.{layer}.2.weight"].T + t[f"layers.{layer}.2.bias"]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_published_surrogate_folder_loads_and_predicts(tmp_path, kind):
    tensors = published_folder(tmp_path / f"KVzap-{kind}-tiny", kind)
    model = load_surrogate(Config(), kind, tmp_path / f"KVzap-{kind}-tiny")
    x = torch.randn(1, 6, D)
    for layer in range(LAYERS):
        got = model.layer(layer, x)  # (1, H, 6)
        torch.testing.assert_close(got, by_hand(tensors, kind, layer, x[0]).T.unsqueeze(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_kvzap_method_scores_are_the_surrogates_prediction(tmp_path, kind):
    tensors = published_folder(tmp_path / "w" / f"kvzap-{kind}", kind)
    model = tiny_model("llama")
    attention.install(model)
    method = get_method("kvzap", kind=kind, weights=str(tmp_path / "w"))
    assert method.allocation == "global" and method.protected_recent(1000, 10) == 128
    ids = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(0))
    cache, scores, recorder = prefill_and_score(model, ids, method, chunk=16)
    for layer, (s, hidden) in enumerate(zip(scores, recorder.hidden)):
        want = by_hand(tensors, kind, layer, hidden[0].float()).T.unsqueeze(0)
        torch.testing.assert_close(s, want, rtol=2e-3, atol=2e-3)  # fp16-stored state


def test_threshold_mode_keeps_scores_at_or_above_tau():
    method = get_method("kvzap", threshold=-4.0)
    scores = torch.tensor([[[float("inf"), -5.0, -4.0, -3.0, -10.0]]])
    assert method.keep_mask(scores).tolist() == [[[True, False, True, True, False]]]


def test_missing_surrogate_names_the_hub_repo_and_the_train_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    from kvbench import downloads

    downloads.hub_problem.cache_clear()
    with pytest.raises(ModelError) as err:
        load_surrogate(Config(), "linear")
    downloads.hub_problem.cache_clear()
    message = str(err.value)
    assert "\n" not in message
    assert "nvidia/KVzap-linear-tiny-kvzap" in message
    assert "kvbench train kvzap --model org/tiny-kvzap --kind linear" in message


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="linear' or 'mlp"):
        get_method("kvzap", kind="cubic")


TOKENS, WINDOW = 300, 128


def _kvzap_on_tiny(tmp_path, spec_options: dict, layout: Layout, ratio: float | None = None):
    """A random MLP surrogate on the tiny Llama: the method's kept positions after one-shot eviction,
    and each layer's predicted scores computed by hand from the recorded attention inputs."""
    tensors = published_folder(tmp_path / "w" / "kvzap-mlp", "mlp", seed=3)
    model = tiny_model("llama")
    attention.install(model)
    name = spec_options.pop("name", "kvzap")
    method = get_method(name, weights=str(tmp_path / "w"), **spec_options)
    ids = torch.randint(3, 300, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    session = Session(model, prefill_chunk=64)
    with HiddenRecorder(engine.attention_modules(model), None) as recorder:
        prefill = session.prefill(ids, [method], layout=layout)
    full = [layer.keys.clone() for layer in prefill.cache.layers]
    budget = Budget(ratio, method.allocation)
    compressed = session.cut(prefill, session.score(prefill, method, budget), budget, consume=True)
    predicted = [by_hand(tensors, "mlp", layer, hidden[0].float()).T for layer, hidden in enumerate(recorder.hidden)]
    return kept_positions(compressed.cache, full), predicted, compressed


def _threshold_between_scores(predicted: list[torch.Tensor]) -> float:
    """A τ near the median that no score comes within 0.01 of (kvbench stores scores in fp16)."""
    values = torch.cat([p.flatten() for p in predicted]).sort().values
    gaps = values[1:] - values[:-1]
    middle = len(values) // 2
    index = middle + int(gaps[middle:].gt(0.02).float().argmax())
    return float(values[index] + values[index + 1]) / 2


@pytest.mark.parametrize("sinks, prefix", [(0, 0), (4, 10)])
def test_threshold_keep_set_is_the_papers_rule(tmp_path, sinks, prefix):
    """DMSPress(KVzapPress(...), threshold=τ) written out: an entry older than the 128-token sliding
    window goes when its predicted log KVzip+ is below τ; with sinks=0 and no template prefix that is
    kvpress's rule exactly, otherwise the first max(sinks, prefix) tokens are kept too."""
    _, predicted, _ = _kvzap_on_tiny(tmp_path / "probe", {"threshold": 0.0}, Layout())
    tau = _threshold_between_scores(predicted)
    kept, _, compressed = _kvzap_on_tiny(tmp_path, {"threshold": tau, "sinks": sinks}, Layout(prefix=prefix))
    first = max(sinks, prefix)
    for layer, scores in enumerate(predicted):
        for head in range(scores.shape[0]):
            rule = {j for j in range(TOKENS) if j >= TOKENS - WINDOW or j < first or scores[head, j] >= tau}
            assert kept[layer][head] == rule
    evicted = sum(TOKENS - len(head) for layer in kept for head in layer)
    assert 0 < evicted < (TOKENS - WINDOW) * 4  # τ really splits the old entries
    assert compressed.eviction.measured_ratio == pytest.approx(evicted / (TOKENS * 4))


def test_kvzap_ratio_keeps_the_window_and_sinks_outside_the_budget(tmp_path):
    """kvzap_ratio: the best of the other entries under one global budget, which is the ratio of
    those others alone; the measured ratio is lower than requested accordingly."""
    ratio = 0.5
    kept, predicted, compressed = _kvzap_on_tiny(tmp_path, {"name": "kvzap_ratio"}, Layout(), ratio)
    candidates = [(float(scores[h, j]), layer, h, j) for layer, scores in enumerate(predicted)
                  for h in range(scores.shape[0]) for j in range(4, TOKENS - WINDOW)]
    per_head = (TOKENS - 4 - WINDOW) - round(ratio * (TOKENS - 4 - WINDOW))
    best = sorted(candidates, reverse=True)[: per_head * 4]
    for layer in range(2):
        for h in range(2):
            rule = set(range(4)) | set(range(TOKENS - WINDOW, TOKENS)) | {j for _, l, hh, j in best
                                                                          if (l, hh) == (layer, h)}
            assert kept[layer][h] == rule
    assert compressed.eviction.measured_ratio == pytest.approx(1 - (4 + WINDOW + per_head) / TOKENS)
    assert compressed.eviction.measured_ratio < ratio
