"""Training on a tiny model: the fit lowers its loss and brings the learned kept set closer to KVzip's."""

from __future__ import annotations

import importlib
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
    gates, record = fit.fit_gates(train_set, config, steps=150, batch=200, progress=False)
    losses = record.losses
    assert sum(losses[-20:]) / 20 < losses[0] - 0.05  # soft targets: BCE has an entropy floor
    teacher = [f.kvzip for f in held_out]
    before = fit.agreement([fit.gate_scores(untrained, f.hidden) for f in held_out], teacher, 0.5)
    after = fit.agreement([fit.gate_scores(gates, f.hidden) for f in held_out], teacher, 0.5)
    assert after > before + 0.05, (before, after)


def test_linear_surrogate_beats_the_mean_and_mlp_lowers_its_loss(data):
    config, train_set, held_out = data
    x, y = fit.sample_positions(train_set, 30, seed=0)
    linear = fit.fit_linear(x, y)
    mlp, record = fit.fit_mlp(x, y, hidden_dim=32, epochs=30, lr=5e-3, batch=64, progress=False)
    losses = record.losses
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


# --- the corpus: general text, disjoint from what the evaluation shows the model -----------------

def _grams(text: str, n: int = 13) -> set[tuple[str, ...]]:
    """Word n-grams after lower-casing and dropping punctuation (the usual contamination check)."""
    import re

    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _evaluation_texts():
    """Every evaluation text available offline: RULER's haystack, the shipped task data, the stdlib task."""
    import gzip
    from pathlib import Path

    import kvbench.tasks as tasks_pkg
    from kvbench.tasks.code import stdlib_files, stdlib_root
    from kvbench.tasks.ruler import essay_text

    yield "ruler essays", essay_text()
    data = Path(tasks_pkg.__file__).parent / "data"
    for path in sorted(data.rglob("*")):
        if path.suffix == ".gz":
            yield path.name, gzip.decompress(path.read_bytes()).decode("utf-8")
        elif path.suffix in (".json", ".jsonl", ".txt"):
            yield path.name, path.read_text(encoding="utf-8")
    root = stdlib_root()
    for rel in stdlib_files(root):
        yield rel, (root / rel).read_text(encoding="utf-8", errors="replace")


def test_default_corpus_shares_no_13_word_sequence_with_any_evaluation_text():
    from kvbench.training.corpus import python_corpus

    corpus = python_corpus()
    assert corpus.licence.startswith("PSF") and len(corpus.sha256) == 64
    assert sum(len(d) for d in corpus.documents) > 500_000  # hundreds of thousands of tokens of prose
    grams = set().union(*(_grams(d) for d in corpus.documents))
    checked = 0
    for name, text in _evaluation_texts():
        shared = grams & _grams(text)
        assert not shared, (name, " ".join(next(iter(shared))))
        checked += 1
    assert checked > 50  # essays, GSM8K, multi_news, and the stdlib task's files


def test_corpus_files_and_their_errors(tmp_path):
    from kvbench.errors import UsageError
    from kvbench.training.corpus import read_corpus

    (tmp_path / "a.jsonl").write_text('{"body": "one"}\n\n{"body": "two"}\n')
    corpus = read_corpus(tmp_path / "a.jsonl", "body")
    assert corpus.documents == ("one", "two")
    assert read_corpus(tmp_path / "a.jsonl", "body").sha256 == corpus.sha256
    with pytest.raises(UsageError, match="line 1 has no text field 'text'"):
        read_corpus(tmp_path / "a.jsonl")
    with pytest.raises(UsageError, match="no such file"):
        read_corpus(tmp_path / "missing.txt")
    (tmp_path / "b.txt").write_text("plain text")
    assert read_corpus(tmp_path / "b.txt").documents == ("plain text",)


def test_token_windows_do_not_overlap_and_chat_share_is_exact():
    tokenizer = tiny_tokenizer()
    docs = [" ".join(f"w{i}" for i in range(j * 100, j * 100 + 100)) for j in range(6)]
    texts = targets.token_windows(tokenizer, docs, (20, 40), seed=1)
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    assert all(18 <= len(i) <= 42 for i in ids)  # decode/encode may merge a token at the edges
    words = [w for t in texts for w in t.split()]
    assert len(words) - len(set(words)) <= len(texts)  # only a word cut at a window edge repeats
    assert sum(targets.chat_flags(10, 0.3, seed=0)) == 3


def test_chat_texts_keep_the_template_tokens():
    tokenizer, model = tiny_tokenizer(), tiny_model("llama")
    from kvbench.core.prompts import split_prompt

    text = "the grass is green and the sky is blue"
    chat, plain = targets.collect(model, tokenizer, [text, text], chat=[True, False])
    assert chat.hidden.shape[1] == len(split_prompt(tokenizer, text, chat_template=True).context_ids)
    assert plain.hidden.shape[1] == len(split_prompt(tokenizer, text, chat_template=False).context_ids)
    assert chat.hidden.shape[1] > plain.hidden.shape[1]


# --- checkpoints: a killed training resumes and ends where an uninterrupted one ends -----------

def _params(module_list) -> list[torch.Tensor]:
    return [p.detach().clone() for m in module_list for p in m.parameters()]


def test_gate_fit_killed_and_resumed_ends_bitwise_equal(data, tmp_path):
    config, train_set, held_out = data
    args = dict(steps=23, batch=64, progress=False, held_out=held_out, validate_every=5)
    reference, ref_log = fit.fit_gates(train_set, config, **args)
    ckpt = fit.Checkpoints(tmp_path / "g.pt", every=4, fingerprint={"run": 1})
    with pytest.raises(fit.TrainingInterrupted):
        fit.fit_gates(train_set, config, **args, checkpoints=fit.Checkpoints(ckpt.path, 4, 11, {"run": 1}))
    assert torch.load(ckpt.path, weights_only=False)["step"] == 8  # the last checkpoint before the kill
    with pytest.raises(fit.TrainingInterrupted):  # killed again, part-way through the resumed piece
        fit.fit_gates(train_set, config, **args, checkpoints=fit.Checkpoints(ckpt.path, 4, 6, {"run": 1}))
    resumed, log = fit.fit_gates(train_set, config, **args, checkpoints=ckpt)
    assert log.resumed_from == 12
    for a, b in zip(_params(reference), _params(resumed)):
        assert torch.equal(a, b)
    assert log.losses == ref_log.losses and log.validation == ref_log.validation
    other = fit.Checkpoints(ckpt.path, 4, None, {"run": 2})  # another training's checkpoint is not used
    _, fresh = fit.fit_gates(train_set, config, **args, checkpoints=other)
    assert fresh.resumed_from == 0


def test_mlp_fit_killed_and_resumed_ends_bitwise_equal(data, tmp_path):
    config, train_set, held_out = data
    x, y = fit.sample_positions(train_set, 30, seed=0)
    xv = torch.cat([f.hidden.float() for f in held_out], dim=1)
    yv = torch.cat([f.plus.transpose(1, 2) for f in held_out], dim=1)
    args = dict(hidden_dim=16, epochs=4, lr=5e-3, batch=64, progress=False, held_out=(xv, yv), validate_every=3)
    reference, ref_log = fit.fit_mlp(x, y, **args)
    steps = len(ref_log.losses)
    assert steps >= 12
    path = tmp_path / "m.pt"
    with pytest.raises(fit.TrainingInterrupted):
        fit.fit_mlp(x, y, **args, checkpoints=fit.Checkpoints(path, 5, steps - 3))
    resumed, log = fit.fit_mlp(x, y, **args, checkpoints=fit.Checkpoints(path, 5))
    assert 0 < log.resumed_from < steps
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert log.losses == ref_log.losses


def test_train_end_to_end_killed_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    """``train`` on a tiny model folder and a local corpus: a run stopped part-way and run again writes
    the same weights as one run through, and the provenance says what made them."""
    import json

    from tiny_models import save_tiny
    train_mod = importlib.import_module("kvbench.training.train")

    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    folder = save_tiny(tmp_path / "tiny", "llama")
    rng = random.Random(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(300))}) + "\n"
                              for _ in range(8)))
    base = dict(model=str(folder), budget="quick", corpus=str(corpus), allow_dirty=True, checkpoint_every=4,
                validate_every=5, overrides={"texts": 4, "validation": 2, "length": 60, "steps": 13, "batch": 40,
                                             "epochs": 3, "positions": 40, "hidden_dim": 8})
    for what in ("gated", "kvzap"):
        straight = train_mod.train(train_mod.TrainConfig(what, out=tmp_path / "a", **base), log=lambda *_: None)
        with pytest.raises(fit.TrainingInterrupted):
            train_mod.train(train_mod.TrainConfig(what, out=tmp_path / "b", stop_after=6, **base), log=lambda *_: None)
        resumed = train_mod.train(train_mod.TrainConfig(what, out=tmp_path / "b", **base), log=lambda *_: None)
        assert straight.exists() and resumed.exists()
        weights = [p for p in (tmp_path / "a").rglob("*") if p.is_file() and p.suffix != ".json"]
        assert weights
        for a in weights:
            assert a.read_bytes() == (tmp_path / "b" / a.relative_to(tmp_path / "a")).read_bytes(), a
        stem = "gated" if what == "gated" else "kvzap-mlp"
        info = json.loads((tmp_path / "b" / f"{stem}.json").read_text())
        assert info["resumed_from_step"] == 4 and info["allow_dirty"] is True
        assert info["corpus"]["sha256"] and info["budget"] == "quick" and info["deviations_from_paper"]
        assert info["validation_loss_curve"] and info["loss"]


def test_train_refuses_a_dirty_checkout(tmp_path, monkeypatch):
    from kvbench.errors import UsageError
    train_mod = importlib.import_module("kvbench.training.train")

    monkeypatch.setattr(train_mod, "git_state", lambda: ("0" * 40, True))
    monkeypatch.setattr("kvbench.models.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "c.txt").write_text("text")
    with pytest.raises(UsageError, match="--allow-dirty"):
        train_mod.train(train_mod.TrainConfig("gated", model="x", corpus=str(tmp_path / "c.txt")))


@pytest.mark.parametrize("args, message", [
    (["--texts", "0"], "--texts must be at least 1"),
    (["--corpus", "MISSING"], "no such file"),
    (["--corpus", "ROWS"], "has no text field 'text'"),
    (["--chat-fraction", "2"], "--chat-fraction"),
])
def test_train_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys, monkeypatch):
    from kvbench.cli import main

    monkeypatch.setattr("kvbench.models.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "rows.jsonl").write_text('{"body": "x"}\n')
    args = [str(tmp_path / "missing.txt") if a == "MISSING" else str(tmp_path / "rows.jsonl") if a == "ROWS" else a
            for a in args]
    code = main(["train", "gated", "--allow-dirty", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_presets_and_recorded_deviations_worked_by_hand():
    train_mod = importlib.import_module("kvbench.training.train")
    paper = train_mod.preset("gated", "paper", 8192)
    assert (paper.steps, paper.batch, paper.lengths, paper.tokens) == (5000, 1000, (819, 6400), 1_000_000)
    assert train_mod.deviations(paper, paper, "gated", "mlp", 278) == []  # ceil(1e6 / 3609.5) texts
    kvzap_paper = train_mod.preset("kvzap", "paper", 8192)
    standard = train_mod.preset("kvzap", "standard", 8192)
    assert train_mod.deviations(standard, kvzap_paper, "kvzap", "mlp", 40) == [
        "tokens per text: 1000-1000 (paper, scaled: 750-1250)",
        "training texts: 40 (paper 4500)",
        "optimisation steps: 585 (paper 65,910)",  # 40*500//512 * 15 and 4500*500//512 * 15
    ]


def test_gemma3_weights_hold_its_global_layers_only(tmp_path):
    """Gemma 3's sliding-window layers are never scored: training collects targets and writes weights
    for its full-attention layers (read from the config here), and the methods load them."""
    from kvbench.errors import WeightsError
    from kvbench.methods.gated import Gated
    from kvbench.methods.kvzap import KVzap
    from tiny_models import prefill_and_score

    model, tokenizer = tiny_model("gemma3"), tiny_tokenizer()
    global_layers = [i for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"]
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(40)) + "." for _ in range(3)]
    features = targets.collect(model, tokenizer, texts, desc="tiny gemma3")
    assert features[0].hidden.shape[0] == features[0].kvzip.shape[0] == len(global_layers) == 2
    assert features[0].kvzip.shape[-1] == features[0].hidden.shape[1] > 16  # the whole text, not a window

    gates, _ = fit.fit_gates(features, model.config, steps=3, batch=20, progress=False)
    write_gates(gates, tmp_path / "gated.safetensors", layers=global_layers)
    loaded = read_gates(tmp_path / "gated.safetensors", model.config)
    assert [g is not None for g in loaded] == [i in global_layers for i in range(4)]
    x, y = fit.sample_positions(features, 10, seed=0)
    write_surrogate(fit.fit_linear(x, y, layer_indices=global_layers), tmp_path / "kvzap-linear")

    ids = torch.tensor([tokenizer.encode(texts[0])])
    for method in (Gated(weights=str(tmp_path)), KVzap(kind="linear", weights=str(tmp_path))):
        method.setup(model)
        _, scores, recorder = prefill_and_score(model, ids, method)
        for layer in global_layers:  # the learned scorer's own output on that layer's attention inputs
            reference = loaded[layer](recorder.hidden[layer].float()) if method.name == "gated" \
                else method.surrogate(model.config).layer(layer, recorder.hidden[layer])
            assert scores[layer] is not None
            finite = torch.isfinite(scores[layer])
            torch.testing.assert_close(scores[layer][finite], reference.float()[finite], rtol=1e-3, atol=1e-3)

    write_gates(gates[:1], tmp_path / "one" / "gated.safetensors", layers=global_layers[:1])
    with pytest.raises(WeightsError, match=r"no gate for layers \[3\]"):
        Gated(weights=str(tmp_path / "one")).setup(model)
