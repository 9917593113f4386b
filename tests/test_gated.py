"""Fast KVzip gates: the gate formula by hand, the published file format, the method, the missing-weights error."""

from __future__ import annotations

import math

import pytest
import torch

from kvbench.core import attention, engine
from kvbench.cli import main
from kvbench.plugins import get_method
from kvbench.models import ModelError
from kvbench.core.scoring import HiddenRecorder
from kvbench.methods.gated import load_gates, read_gates, write_gates
from tiny_models import prefill_and_score, save_tiny, tiny_model

H, G, WIDTH, SINKS, D = 2, 2, 16, 16, 64  # tiny models: 2 KV heads, 4 query heads, hidden 64


def published_states(layers: int, seed: int = 0, dtype=torch.bfloat16) -> list[dict[str, torch.Tensor]]:
    """State dicts with the key names and shapes of Jang-Hyun/Fast-KVzip's q{G}_dim16_sink16.pt files."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    return [{
        "q_proj.weight": rand(H * G * WIDTH, D), "q_proj.bias": rand(H * G * WIDTH),
        "k_proj.weight": rand(H * WIDTH, D),
        "q_norm.weight": 1 + rand(WIDTH, scale=0.1), "k_norm.weight": 1 + rand(WIDTH, scale=0.1),
        "k_base": rand(H, 1, SINKS, WIDTH, scale=1.0), "b": rand(H, 1, G, scale=1.0),
    } for _ in range(layers)]


def rms(v, weight, eps=1e-6):
    return [x / math.sqrt(sum(y * y for y in v) / len(v) + eps) * w for x, w in zip(v, weight)]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def gate_by_hand(state, x):
    """Fast KVzip's gate written out with Python floats: ``x`` a list of d floats → one score per KV head."""
    s = {k: v.float().tolist() for k, v in state.items()}
    q_full = [dot(row, x) + bias for row, bias in zip(s["q_proj.weight"], s["q_proj.bias"])]
    k_full = [dot(row, x) for row in s["k_proj.weight"]]
    scores = []
    for h in range(H):
        k = rms(k_full[h * WIDTH:(h + 1) * WIDTH], s["k_norm.weight"])
        per_query = []
        for g in range(G):
            start = (h * G + g) * WIDTH
            q = rms(q_full[start:start + WIDTH], s["q_norm.weight"])
            own = math.exp(dot(k, q) / 4 + s["b"][h][0][g])
            sinks = sum(math.exp(dot(k_s, q) / 4) for k_s in s["k_base"][h][0])
            per_query.append(own / (own + sinks))
        scores.append(sum(per_query) / G)
    return scores


class Config:  # the model config fields the loaders read
    num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size = 2, 4, 2, 64
    name_or_path = "/somewhere/tiny-gated"


def test_gate_score_equals_the_design_formula_by_hand(tmp_path):
    states = published_states(2)
    path = tmp_path / "q2_dim16_sink16.pt"
    torch.save({"module": states, "loss": [0.1]}, path)
    gates = read_gates(path, Config())  # published layout, read with weights_only=True
    x = torch.randn(1, 5, D, generator=torch.Generator().manual_seed(1))
    got = gates[1](x)
    assert got.shape == (1, H, 5)
    want = torch.tensor([gate_by_hand(states[1], x[0, t].tolist()) for t in range(5)]).T.unsqueeze(0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert float(want.std()) > 1e-3  # scores differ across tokens and heads: the check can fail


def test_kvbench_safetensors_round_trip_keeps_the_published_names(tmp_path):
    gates = read_gates(_pt(tmp_path), Config())
    write_gates(gates, tmp_path / "gated.safetensors", dtype=torch.float32)
    again = load_gates(Config(), tmp_path)  # a folder: finds gated.safetensors
    x = torch.randn(1, 7, D)
    torch.testing.assert_close(again[0](x), gates[0](x))


def _pt(tmp_path):
    path = tmp_path / "q2_dim16_sink16.pt"
    torch.save({"module": published_states(2)}, path)
    return path


def test_gate_file_for_another_model_shape_is_a_clear_error(tmp_path):
    class Wider(Config):
        hidden_size = 128

    with pytest.raises(ModelError, match="do not fit"):
        read_gates(_pt(tmp_path), Wider())


def test_gated_method_scores_each_token_from_its_own_attention_input(tmp_path):
    model = tiny_model("llama")
    attention.install(model)
    path = _pt(tmp_path)
    method = get_method("gated", weights=str(path))
    assert method.allocation == "global" and method.hidden_window() is None and method.incremental
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    cache, scores, recorder = prefill_and_score(model, ids, method, chunk=16)
    gates = read_gates(path, Config())
    for layer, (s, hidden) in enumerate(zip(scores, recorder.hidden)):
        torch.testing.assert_close(s, gates[layer](hidden), rtol=0, atol=1e-3)  # fp16-stored state

    # all at once from recorded inputs (one chunk of 40) gives the same scores as chunks of 16
    cache2 = engine.new_cache(model)
    method2 = get_method("gated", weights=str(path))
    rec = HiddenRecorder(engine.attention_modules(model), None)
    engine.prefill(model, cache2, ids, 0, 40)
    rec.remove()
    again = engine.score_layers(model, cache2, method2, recorder=rec)
    for a, b in zip(again, scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


def test_recent_window_follows_the_reference():
    """Fast KVzip's prefill/model/wrapper.py: 2% of a context shorter than its 16,000-token prefill
    chunk, else 4,096 tokens; math/run_math.py: the 128 most recent tokens while decoding."""
    method = get_method("gated")
    assert method.protected_recent(1000, 300) == 20  # 2% of a short context
    assert method.protected_recent(15_999, 300) == 319
    assert method.protected_recent(16_000, 3000) == 4096
    assert method.protected_recent(100_000, 30_000) == 4096
    assert method.protected_recent(1000, 300, decoding=True) == 128
    assert method.protected_recent(100_000, 30_000, decoding=True) == 128


def test_missing_gates_name_what_was_looked_for_and_the_train_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    from kvbench import downloads
    from kvbench.methods import gated

    downloads.hub_problem.cache_clear()
    folder = save_tiny(tmp_path / "tiny-nogates", "llama", max_position_embeddings=2048)
    model = tiny_model("llama")
    model.config.name_or_path = str(folder)
    with pytest.raises(ModelError) as err:
        get_method("gated").setup(model)  # what the runner calls once the model is loaded
    downloads.hub_problem.cache_clear()
    message = str(err.value)
    assert "\n" not in message
    assert "no gated weights for model 'tiny-nogates'" in message
    assert str(gated.SHIPPED / "tiny-nogates" / "gated.safetensors") in message
    assert "Jang-Hyun/Fast-KVzip/tiny-nogates/q2_dim16_sink16.pt" in message
    assert message.endswith(f"make them with: kvbench train gated --model {folder}")


def test_run_with_weights_option_uses_the_given_gates(tmp_path, capsys):
    folder = save_tiny(tmp_path / "tiny", "llama", max_position_embeddings=2048)
    torch.save({"module": published_states(2)}, tmp_path / "gates.pt")
    code = main(["run", "--model", str(folder), "--method", "gated", "--ratio", "0.5", "--task",
                 "ruler:niah_single_1", "--length", "512", "--samples", "1", "--out", str(tmp_path / "r"),
                 "--weights", str(tmp_path / "gates.pt")])
    assert code == 0, capsys.readouterr().err


def test_shipped_weights_for_the_default_model_load_with_their_provenance():
    import json

    from kvbench.methods.gated import SHIPPED
    from kvbench.methods.kvzap import load_surrogate

    class SmolLM2:  # smollm2-135m: 30 layers, 9 query heads, 3 KV heads, hidden 576
        num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size = 30, 9, 3, 576
        name_or_path = "/cache/models/smollm2-135m"

    gates = load_gates(SmolLM2())
    assert len(gates) == 30 and gates[0].k_base.shape == (3, 1, 16, 16) and gates[0].b.shape == (3, 1, 3)
    for kind in ("linear", "mlp"):
        assert load_surrogate(SmolLM2(), kind).n_modules == 30
    for stem in ("gated", "kvzap-linear", "kvzap-mlp"):
        provenance = json.loads((SHIPPED / "smollm2-135m" / f"{stem}.json").read_text())
        assert provenance["command"].startswith("kvbench train")
        assert set(provenance["validation"]["agreement_with_kvzip"]) == {"0.5", "0.7"}
