"""The engine on CUDA, against references computed on the CPU or by transformers: generation, eviction,
decode kernels, peak memory and recovery from a real out-of-memory error. Skipped without CUDA
(the Triton kernels' own CUDA tests are in tests/test_triton_kernels.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from kvbench.core import attention
from kvbench.core.budget import Budget
from kvbench.core.session import Session
from kvbench.plugins import get_method
from tiny_models import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def compressed_answer(model, device, method_name="snapkv", allocation="global", backend="sdpa", ratio=0.6):
    session = Session(model, prefill_chunk=16, decode_kernels=backend)
    torch.manual_seed(3)
    context = torch.randint(3, 300, (1, 120)).to(device)
    method = get_method(method_name, window_size=8, allocation=allocation) if method_name == "snapkv" \
        else get_method(method_name)
    compressed = session.compress(context, method, Budget(ratio, method.allocation))
    answer = session.answer(compressed, [5, 6, 7], 12)
    return compressed, answer, session


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_full_cache_generation_on_cuda_equals_transformers(arch):
    reference = tiny_model(arch).to(CUDA)
    reference.generation_config.eos_token_id = None
    model = copy.deepcopy(reference)
    attention.install(model)
    torch.manual_seed(1)
    context, question = torch.randint(3, 300, (1, 90)).to(CUDA), torch.randint(3, 300, (1, 6)).to(CUDA)
    out = reference.generate(torch.cat([context, question], 1), max_new_tokens=12, do_sample=False,
                             past_key_values=DynamicCache(), pad_token_id=0)
    session = Session(model, prefill_chunk=16)
    prefill = session.prefill(context)
    answer = session.answer(session.full(prefill, get_method("full")), question[0].tolist(), 12)
    assert answer.tokens == out[0, context.shape[1] + question.shape[1]:].tolist()


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_eviction_on_cuda_equals_the_cpu(allocation):
    cpu_model = tiny_model("qwen3")
    cpu_model.generation_config.eos_token_id = None
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    for model in (cpu_model, gpu_model):
        attention.install(model)
    cpu, cpu_answer, _ = compressed_answer(cpu_model, torch.device("cpu"), allocation=allocation)
    gpu, gpu_answer, _ = compressed_answer(gpu_model, CUDA, allocation=allocation)
    assert gpu.eviction.measured_ratio == pytest.approx(cpu.eviction.measured_ratio, abs=0.02)
    assert gpu.kv_bytes_physical == pytest.approx(cpu.kv_bytes_physical, rel=0.05)
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernels_on_cuda_equal_sdpa(backend, dtype):
    from kvbench.kernels import resolve_backend

    assert resolve_backend(backend, CUDA) == backend
    model = tiny_model("llama").to(CUDA, dtype)
    model.generation_config.eos_token_id = None
    attention.install(model)
    _, expected, _ = compressed_answer(model, CUDA)
    _, answer, _ = compressed_answer(model, CUDA, backend=backend)
    agree = sum(a == b for a, b in zip(answer.tokens, expected.tokens)) / len(expected.tokens)
    assert agree == 1.0 if dtype == torch.float32 else agree >= 0.75  # bf16: rounding may flip a late tie


def test_cuda_peak_is_max_memory_allocated_and_covers_the_cache():
    model = tiny_model("llama").to(CUDA)
    attention.install(model)
    compressed, answer, session = compressed_answer(model, CUDA, method_name="window", allocation="uniform")
    peak, kind = session.peak(answer.peak_bytes)
    assert kind == "cuda_max_allocated" and peak == torch.cuda.max_memory_allocated(CUDA)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert peak >= weights + compressed.kv_bytes_full  # the full prefill was held before eviction


def test_a_real_out_of_memory_error_is_recorded_and_the_next_cell_runs(tmp_path, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    from kvbench.plugins import method_class

    def greedy_score(self, view):
        return torch.empty(1 << 50, device=view.keys.device)  # a petabyte: a real CUDA OOM

    monkeypatch.setattr(method_class("knorm"), "score", greedy_score)
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_benchmark_cuda", path)
    gpu = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu
    spec.loader.exec_module(gpu)
    out = tmp_path / "gpu.txt"
    code = gpu.main(["--models", "config:llama-3.1-8b-tiny", "--device", "cuda", "--lengths", "512",
                     "--methods", "knorm,window,kvzip,gated", "--ratios", "0.5", "--out", str(out)])
    assert code == 0
    rows = {line.split()[2]: line for line in out.read_text().splitlines() if line.startswith("config:")}
    assert "OutOfMemoryError" in rows["knorm"]
    for name in ("full", "window", "kvzip", "gated"):
        assert "Error" not in rows[name], rows[name]
    assert "bfloat16" in out.read_text()  # CUDA's default dtype
