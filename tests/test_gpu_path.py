"""The CUDA path, checked on the CPU: config models, decode kernels in the session, out-of-memory
recovery, and ``benchmarks/gpu.py --dry-run``. ``tests/test_gpu.py`` repeats what needs CUDA on it."""

from __future__ import annotations

import gc
import importlib.util
import sys
import weakref
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvbench.core import attention
from kvbench.core.budget import Budget
from kvbench.core.session import Session
from kvbench.errors import ModelError
from kvbench.models import CONFIG_MODELS, load_config_model, load_model
from kvbench.plugins import get_method
from kvbench.run.runner import release_failed_cell
from tiny_models import tiny_model

USES_TRITON_INTERPRETER = True  # the decode-kernel tests run the Triton kernels interpreted (conftest.py)
ROOT = Path(__file__).resolve().parents[1]


def load_gpu_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# Parameter counts of the published checkpoints: total_size / 2 in each repo's bf16
# model.safetensors.index.json (16,060,522,496 and 16,381,470,720 bytes).
PUBLISHED_PARAMETERS = {"llama-3.1-8b": 8_030_261_248, "qwen3-8b": 8_190_735_360}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_config_models_have_the_published_parameter_count_and_kv_shape(name):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CONFIG_MODELS[name].config())
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == 8 * 128  # 8 KV heads of 128: 128 KiB of bf16 K/V per token over 32 layers
    tiny = CONFIG_MODELS[f"{name}-tiny"].config()
    big = CONFIG_MODELS[name].config()
    assert tiny.model_type == big.model_type and tiny.rope_parameters == big.rope_parameters
    assert tiny.num_attention_heads // tiny.num_key_value_heads == big.num_attention_heads // big.num_key_value_heads


def test_config_model_weights_are_seeded_and_leave_the_callers_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_config_model("config:qwen3-8b-tiny", "cpu", "float32", seed=0)
    assert torch.equal(torch.rand(3), expected_next)
    b = load_config_model("config:qwen3-8b-tiny", "cpu", "float32", seed=0)
    c = load_config_model("config:qwen3-8b-tiny", "cpu", "float32", seed=1)
    weights = [dict(m.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"] for m in (a, b, c)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert a.model.config.name_or_path == "config:qwen3-8b-tiny" and a.dtype == torch.float32
    ids = a.tokenizer.encode("Repeat é", add_special_tokens=False)
    assert len(ids) == len("Repeat é".encode()) and max(ids) < 256  # one id per byte, inside every vocabulary
    assert a.tokenizer.decode(ids) == "Repeat é"
    with pytest.raises(ModelError, match="unknown config model 'config:llama-9b'.*config:llama-3.1-8b"):
        load_config_model("config:llama-9b")


def test_tasks_refuse_config_models(tmp_path, capsys):
    from kvbench.cli import main

    with pytest.raises(ModelError, match="random weights and no real tokenizer"):
        load_model("config:llama-3.1-8b-tiny")
    out = tmp_path / "out"
    assert main(["run", "--method", "window", "--ratio", "0.5", "--model", "config:llama-3.1-8b-tiny",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config:llama-3.1-8b-tiny has random weights" in err[0]
    assert not out.exists()


def decode(model, backend: str, allocation: str) -> tuple[list[int], torch.Tensor]:
    """Compress a context with snapkv, then answer a question greedily through ``backend`` (the padded
    layout, whose decode kernel these tests count; the packed layout's is tested in test_triton_kernels)."""
    session = Session(model, prefill_chunk=16, decode_kernels=backend, layout="padded")
    torch.manual_seed(3)
    context = torch.randint(3, 300, (1, 80))
    method = get_method("snapkv", window_size=8, allocation=allocation)
    compressed = session.compress(context, method, Budget(0.6, allocation))
    assert (compressed.cache.layers[0].valid is not None) == (allocation != "uniform")
    answer = session.answer(compressed, [5, 6, 7], 10)
    # the logits of one decoded token over the compressed cache, for a closer comparison than tokens
    compressed.cache.decode_kernels = backend
    logits = attention_logits(session, compressed)
    return answer.tokens, logits


def attention_logits(session, compressed):
    from kvbench.core import engine

    lengths = compressed.cache.lengths()
    logits = engine.forward(session.model, compressed.cache, torch.tensor([[9]]), compressed.tokens)
    compressed.cache.rollback(lengths)
    return logits


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decoding_through_the_kernels_equals_sdpa(backend, allocation):
    model = tiny_model("qwen3")
    model.generation_config.eos_token_id = None
    attention.install(model)
    expected_tokens, expected_logits = decode(model, "sdpa", allocation)
    tokens, logits = decode(model, backend, allocation)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert tokens == expected_tokens and len(tokens) == 10


def test_decode_kernel_wiring_reaches_the_kernels(monkeypatch):
    """The equality above could hold if the backend were ignored: count the kernel calls."""
    import kvbench.core.attention as module

    calls = []
    real = module.decode_attention_padded
    monkeypatch.setattr(module, "decode_attention_padded",
                        lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    model = tiny_model("llama")
    attention.install(model)
    decode(model, "torch", "global")
    assert calls and set(calls) == {"torch"}
    calls.clear()
    decode(model, "sdpa", "global")
    assert not calls
    with pytest.raises(ValueError, match="unknown decode kernels 'cuda'"):
        Session(model, decode_kernels="cuda")


def test_a_failed_cell_releases_its_tensors():
    """What a failing frame allocated must be freed before CUDA's cache is emptied, not when the
    exception is finally dropped."""
    held = []

    def failing_cell():
        buffer = torch.empty(1 << 20)
        held.append(weakref.ref(buffer))
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    try:
        failing_cell()
    except torch.OutOfMemoryError as err:
        gc.collect()
        assert held[0]() is not None  # the traceback keeps the frame, and the buffer, alive
        release_failed_cell(err, torch.device("cpu"))
        gc.collect()
        assert held[0]() is None


def test_out_of_memory_in_a_sweep_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from kvbench.cli import main
    from kvbench.methods.snapkv import SnapKV
    from kvbench.results import read_results
    from tiny_models import save_tiny

    def out_of_memory(self, view):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    monkeypatch.setattr(SnapKV, "score", out_of_memory)
    model = save_tiny(tmp_path / "tiny")
    out = tmp_path / "out"
    code = main(["sweep", "--methods", "snapkv,window", "--ratios", "0.5,0.8", "--model", str(model), "--task",
                 "ruler:niah_single_1", "--length", "512", "--samples", "2", "--device", "cpu", "--dtype", "float32",
                 "--out", str(out)])
    assert code == 0
    frame = read_results(out)
    failed = frame[frame["method"] == "snapkv"]
    assert len(failed) == 4 and failed["error"].str.startswith("OutOfMemoryError: CUDA out of memory").all()
    others = frame[frame["method"] != "snapkv"]
    assert len(others) == 6 and others["error"].isna().all() and others["score"].notna().all()


def test_gpu_benchmark_dry_run(tmp_path, capsys):
    gpu = load_gpu_benchmark()
    out = tmp_path / "gpu.txt"
    code = gpu.main(["--dry-run", "--models", "config:llama-3.1-8b-tiny", "--methods", "window,kvzip,gated",
                     "--lengths", "96", "--kernels", "torch,sdpa", "--decode-tokens", "3", "--out", str(out)])
    assert code == 0
    lines = [line.split() for line in out.read_text().splitlines() if line.startswith("config:")]
    cells = {(cols[2], cols[3]) for cols in lines}
    assert cells == {("full", "-")} | {(m, r) for m in ("window", "kvzip", "gated") for r in ("0.50", "0.90")}
    header = next(line for line in out.read_text().splitlines() if line.startswith("model"))
    assert "tok/s torch" in header and "tok/s sdpa" in header
    for cols in lines:
        assert len(cols) == 14, cols  # every column filled, no error
        if cols[2] == "window":  # recency keeps exactly the budget: physical bytes are (1 - r) of full
            assert abs(float(cols[8]) - (1 - float(cols[3]))) < 0.02
    full = next(cols for cols in lines if cols[2] == "full")
    assert abs(float(full[8]) - 1) < 0.01 and full[11] == "1.000"  # the packed layout's offsets count
    assert "# device: CPU" in out.read_text() and "load average" in out.read_text()


def test_gpu_benchmark_records_out_of_memory_and_timeouts_and_goes_on(tmp_path, monkeypatch):
    import time

    from kvbench.plugins import method_class

    gpu = load_gpu_benchmark()

    def out_of_memory(self, view):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    def slow(self, view):
        time.sleep(5)
        raise AssertionError("the timeout should have fired")

    monkeypatch.setattr(method_class("knorm"), "score", out_of_memory)
    monkeypatch.setattr(method_class("window"), "score", slow)
    out = tmp_path / "gpu.txt"
    code = gpu.main(["--dry-run", "--models", "config:qwen3-8b-tiny", "--methods", "knorm,window,tova",
                     "--ratios", "0.5", "--lengths", "64", "--kernels", "torch", "--timeout", "1", "--out", str(out)])
    assert code == 0
    rows = {line.split()[2]: line for line in out.read_text().splitlines() if line.startswith("config:")}
    assert "OutOfMemoryError: CUDA out of memory (simulated)" in rows["knorm"]
    assert "CellTimeout: cell ran past 1 s" in rows["window"]
    assert "Error" not in rows["tova"] and "Error" not in rows["full"]


def test_gpu_benchmark_bad_input(capsys):
    gpu = load_gpu_benchmark()
    assert gpu.main(["--dry-run", "--kernels", "cuda"]) == 2
    assert gpu.main(["--dry-run", "--methods", "nope"]) == 2
    assert gpu.main(["--dry-run", "--ratios", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "unknown kernels cuda" in err[0] and "unknown method nope" in err[1] and "1.5" in err[2]
