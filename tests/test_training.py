"""Training on a tiny model: the fit lowers its loss and brings the learned kept set closer to KVzip's."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from kvbench.training import fit, targets
from kvbench.methods.gated import SinkGate, read_gates, write_gates
from kvbench.methods.kvzap import read_surrogate, write_surrogate
from tiny_models import tiny_model, tiny_tokenizer

WORDS = ("the grass is green sky blue sun yellow here we go there and back again one of special magic "
         "numbers for key what are all 1234567").split()


@pytest.fixture(scope="module")
def data():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(40)) + "." for _ in range(14)]
    features = targets.collect(model, tokenizer, texts, desc="tiny")
    return model.config, features[:10], features[10:]


def test_collected_targets_cover_the_text_tokens(data):
    config, train_set, _ = data
    f = train_set[0]
    layers, n, dim = f.hidden.shape
    assert (layers, dim) == (config.num_hidden_layers, config.hidden_size)
    assert f.kvzip.shape == f.plus.shape == (layers, config.num_key_value_heads, n)
    assert 0 <= float(f.kvzip.min()) and float(f.kvzip.max()) <= 1
    assert torch.isfinite(f.plus).all()


def test_gate_training_lowers_the_loss_and_raises_agreement_with_kvzip(data):
    config, train_set, held_out = data
    untrained, _ = fit.fit_gates(train_set, config, steps=0, batch=200, progress=False)
    gates, losses = fit.fit_gates(train_set, config, steps=150, batch=200, progress=False)
    assert sum(losses[-20:]) / 20 < losses[0] - 0.05  # soft targets: BCE has an entropy floor
    teacher = [f.kvzip for f in held_out]
    before = fit.agreement([fit.gate_scores(untrained, f.hidden) for f in held_out], teacher, 0.5)
    after = fit.agreement([fit.gate_scores(gates, f.hidden) for f in held_out], teacher, 0.5)
    assert after > before + 0.05, (before, after)


def test_linear_surrogate_beats_the_mean_and_mlp_lowers_its_loss(data):
    config, train_set, held_out = data
    x, y = fit.sample_positions(train_set, 30, seed=0)
    linear = fit.fit_linear(x, y)
    mlp, losses = fit.fit_mlp(x, y, hidden_dim=32, epochs=30, lr=5e-3, batch=64, progress=False)
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]
    for model in (linear, mlp):
        predicted = [fit.surrogate_scores(model, f.hidden) for f in held_out]
        mse = sum(float(F.mse_loss(p, f.plus)) for p, f in zip(predicted, held_out))
        baseline = sum(float(F.mse_loss(y.mean(dim=1).unsqueeze(-1).expand_as(f.plus), f.plus)) for f in held_out)
        assert mse < baseline
    agree = fit.agreement(predicted, [f.plus for f in held_out], 0.5)
    assert agree > 0.55


def test_written_weights_read_back(tmp_path, data):
    config, train_set, _ = data
    gates, _ = fit.fit_gates(train_set, config, steps=3, batch=50, progress=False)
    write_gates(gates, tmp_path / "gated.safetensors")
    again = read_gates(tmp_path / "gated.safetensors", config)
    x = train_set[0].hidden[0].unsqueeze(0).float()
    torch.testing.assert_close(again[0](x), gates[0](x), rtol=0, atol=2e-2)
    x2, y2 = fit.sample_positions(train_set, 10, seed=1)
    surrogate = fit.fit_linear(x2, y2)
    write_surrogate(surrogate, tmp_path / "kvzap-linear")
    assert isinstance(read_surrogate(tmp_path / "kvzap-linear", config).layers[0], torch.nn.Linear)


def test_global_agreement_is_one_for_the_teacher_itself():
    scores = torch.rand(3, 2, 50)
    assert fit.agreement([scores], [scores], 0.7) == 1.0
    assert fit.agreement([-scores], [scores], 0.5) == 0.0
    assert isinstance(SinkGate(8, 1, 1), torch.nn.Module)
