"""KVzap surrogates: the published folder format, the method's scores, threshold mode, missing weights."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kvbench.core import attention
from kvbench.plugins import get_method
from kvbench.models import ModelError
from kvbench.methods.kvzap import load_surrogate
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
