"""The Triton kernels of kvbench.kernels against the PyTorch reference and against a naive per-head
softmax and a naive gather written here, on ragged, empty and garbage-padded heads.

Without CUDA the kernels run in Triton's interpreter on CPU tensors: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton and keeps it set for this module's tests only
(``USES_TRITON_INTERPRETER``). With CUDA the same tests run the compiled kernels on the GPU, and the
``gpu``-marked ones add realistic shapes. Every test name contains ``triton`` (``pytest -k triton``).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch

USES_TRITON_INTERPRETER = True

pytest.importorskip("triton")

import kvbench.kernels as kernels  # noqa: E402
import kvbench.kernels.triton_kernels as tk  # noqa: E402
from kvbench.kernels import reference  # noqa: E402

INTERPRET = tk.INTERPRETED
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no CUDA, and TRITON_INTERPRET is off", allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
compiled_gpu_only = pytest.mark.skipif(INTERPRET, reason="needs CUDA and compiled (not interpreted) Triton kernels")


@pytest.fixture(autouse=True)
def interpreter_ready():
    problem = tk.interpreter_problem()
    if problem is not None:
        pytest.fail(f"Triton interpreter: {problem}")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def naive_decode(q, keys, values, rows_of, scale):
    """Per query head: its KV head's rows (indices given by ``rows_of``), softmax written out, float64."""
    batch, query_heads, dim = q.shape
    out = torch.zeros(batch, query_heads, dim, dtype=torch.float64)
    for b in range(batch):
        for hq in range(query_heads):
            rows = rows_of(b, hq)
            if not rows:
                continue
            query = q[b, hq].double().cpu()
            logits = [float(query @ keys[r].double().cpu()) * scale for r in rows]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            total = sum(weights)
            for w, r in zip(weights, rows):
                out[b, hq] += (w / total) * values[r].double().cpu()
    return out


def random_packed(batch, heads, group, dim, dtype, lengths, seed):
    """A packed layer whose segments sit in shuffled order with random slack and gaps, every row
    that is not a real entry set to NaN."""
    generator = torch.Generator().manual_seed(seed)
    segments = batch * heads
    length = torch.tensor(lengths, dtype=torch.int64)
    capacity = length + torch.randint(0, 5, (segments,), generator=generator)
    start = torch.empty(segments, dtype=torch.int64)
    row = 0
    for s in torch.randperm(segments, generator=generator).tolist():
        row += int(torch.randint(0, 3, (1,), generator=generator))  # a gap before the segment
        start[s] = row
        row += int(capacity[s])
    keys = torch.full((row + 2, dim), float("nan"))
    values = torch.full((row + 2, dim), float("nan"))
    for s in range(segments):
        real = slice(int(start[s]), int(start[s] + length[s]))
        keys[real] = torch.randn(int(length[s]), dim, generator=generator)
        values[real] = torch.randn(int(length[s]), dim, generator=generator)
    q = torch.randn(batch, heads * group, dim, generator=generator)
    on = dict(device=DEVICE)
    return (q.to(dtype).to(**on), keys.to(dtype).to(**on), values.to(dtype).to(**on),
            start.to(**on), length.to(**on), capacity.to(**on))


def assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_triton_decode_packed_matches_reference_and_naive_softmax(dtype, group):
    batch, heads, dim = 2, 2, 32 if group % 2 else 40  # 40: a head dim that is no power of two
    lengths = [0, 130, 7, 64 + group]  # empty, several splits, shorter than a block, block + a few
    q, keys, values, start, length, _ = random_packed(batch, heads, group, dim, dtype, lengths, seed=group)
    scale = dim ** -0.5
    out = tk.decode_attention_packed(q, keys, values, start, length, group, scale, split_len=64)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()

    def rows_of(b, hq):
        s = b * heads + hq // group
        return list(range(int(start[s]), int(start[s] + length[s])))

    assert_close(out, naive_decode(q, keys, values, rows_of, scale), dtype)
    assert_close(out, reference.decode_attention_packed(q, keys, values, start, length, group, scale), dtype)
    assert (out[0, :group] == 0).all()  # the empty head


def test_triton_decode_packed_default_split_plan_int32_offsets_and_max_length():
    group, heads, dim = 4, 2, 16
    q, keys, values, start, length, _ = random_packed(1, heads, group, dim, torch.float32, [200, 3], seed=5)
    start32, length32 = start.to(torch.int32), length.to(torch.int32)
    expected = reference.decode_attention_packed(q, keys, values, start, length, group, 0.25)
    for max_length in (None, 256):
        out = tk.decode_attention_packed(q, keys, values, start32, length32, group, 0.25, max_length=max_length)
        assert_close(out, expected, torch.float32)


def test_triton_decode_packed_all_heads_empty_gives_zeros():
    q, keys, values, start, length, _ = random_packed(2, 2, 2, 16, torch.float32, [0, 0, 0, 0], seed=3)
    out = tk.decode_attention_packed(q, keys, values, start, length, 2, 0.25)
    assert torch.equal(out, torch.zeros_like(q))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_triton_decode_padded_matches_reference_and_naive_softmax(dtype, group):
    generator = torch.Generator().manual_seed(10 + group)
    batch, heads, slots, dim = 2, 2, 150, 32
    # keys laid out (B, L, H, D) and viewed as (B, H, L, D): the kernel must follow strides.
    keys = torch.randn(batch, slots, heads, dim, generator=generator).transpose(1, 2)
    values = torch.randn(batch, heads, slots, dim, generator=generator)
    valid = torch.rand(batch, heads, slots, generator=generator) < 0.6
    valid[0, 1] = False  # a head with nothing valid
    valid[1, 0, 64:128] = False  # a whole block and split of padding
    keys = keys.masked_fill(~valid.unsqueeze(-1), float("nan"))
    values = values.masked_fill(~valid.unsqueeze(-1), float("nan"))
    q = torch.randn(batch, heads * group, dim, generator=generator)
    q, keys, values, valid = (t.to(DEVICE) for t in (q.to(dtype), keys.to(dtype), values.to(dtype), valid))
    scale = 0.3
    out = tk.decode_attention_padded(q, keys, values, valid, scale, split_len=64)
    assert out.dtype == dtype and torch.isfinite(out).all()

    flat_keys, flat_values = keys.reshape(-1, dim), values.reshape(-1, dim)  # row (b*H + h)*L + i

    def rows_of(b, hq):
        h = hq // group
        return [(b * heads + h) * slots + i for i in range(slots) if valid[b, h, i]]

    assert_close(out, naive_decode(q, flat_keys, flat_values, rows_of, scale), dtype)
    assert_close(out, reference.decode_attention_padded(q, keys, values, valid, scale), dtype)


def test_triton_decode_padded_without_mask_equals_sdpa():
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(1, 8, 16, generator=generator).to(DEVICE)
    keys, values = (torch.randn(1, 2, 70, 16, generator=generator).to(DEVICE) for _ in range(2))
    out = tk.decode_attention_padded(q, keys, values, None, 0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, scale=0.25, enable_gqa=True
    ).squeeze(2)
    assert_close(out, expected, torch.float32)


def naive_compact(keys, values, keep, valid, slack):
    """Heads back to back, each its kept entries in order then ``slack`` spare rows."""
    batch, heads, slots, _ = keys.shape
    rows_k, rows_v, start, length = [], [], [], []
    offset = 0
    for b in range(batch):
        for h in range(heads):
            kept = [i for i in range(slots) if keep[b, h, i] and (valid is None or valid[b, h, i])]
            start.append(offset)
            length.append(len(kept))
            rows_k += [keys[b, h, i] for i in kept]
            rows_v += [values[b, h, i] for i in kept]
            offset += len(kept) + slack
    return rows_k, rows_v, start, length


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("slack", [0, 3])
@pytest.mark.parametrize("with_valid", [False, True])
def test_triton_compact_matches_naive_gather(dtype, slack, with_valid):
    generator = torch.Generator().manual_seed(slack + 7 * with_valid)
    batch, heads, slots, dim = 2, 3, 100, 24
    keys = torch.randn(batch, heads, slots, dim, generator=generator).to(dtype).to(DEVICE)
    values = torch.randn(batch, heads, slots, dim, generator=generator).to(dtype).to(DEVICE)
    keep = (torch.rand(batch, heads, slots, generator=generator) < 0.4).to(DEVICE)
    keep[0, 0] = False  # keeps nothing
    keep[1, 2] = True  # keeps everything
    valid = (torch.rand(batch, heads, slots, generator=generator) < 0.8).to(DEVICE) if with_valid else None
    packed_k, packed_v, start, length, capacity = tk.compact(keys, values, keep, slack, valid)

    rows_k, rows_v, exp_start, exp_length = naive_compact(keys, values, keep, valid, slack)
    assert start.tolist() == exp_start and length.tolist() == exp_length
    assert capacity.tolist() == [n + slack for n in exp_length]
    assert packed_k.shape == (sum(exp_length) + slack * batch * heads, dim) and packed_k.dtype == dtype
    got_k = torch.cat([packed_k[s:s + n] for s, n in zip(exp_start, exp_length)])
    got_v = torch.cat([packed_v[s:s + n] for s, n in zip(exp_start, exp_length)])
    assert torch.equal(got_k, torch.stack(rows_k)) and torch.equal(got_v, torch.stack(rows_v))

    ref = reference.compact(keys, values, keep, slack, valid)
    assert all(torch.equal(a, b) for a, b in zip((start, length, capacity), ref[2:]))


def test_triton_compact_then_decode_equals_masked_padded_decode():
    """What the cache will do: pack the kept entries, then attend over the packed layer."""
    generator = torch.Generator().manual_seed(11)
    batch, heads, group, slots, dim = 1, 4, 2, 90, 16
    keys, values = (torch.randn(batch, heads, slots, dim, generator=generator).to(DEVICE) for _ in range(2))
    keep = (torch.rand(batch, heads, slots, generator=generator) < 0.5).to(DEVICE)
    q = torch.randn(batch, heads * group, dim, generator=generator).to(DEVICE)
    packed_k, packed_v, start, length, _ = tk.compact(keys, values, keep, 2)
    out = tk.decode_attention_packed(q, packed_k, packed_v, start, length, group, 0.25)
    assert_close(out, reference.decode_attention_padded(q, keys, values, keep, 0.25), torch.float32)


def test_triton_kernels_reject_shapes_they_do_not_support():
    q = torch.zeros(1, 4, 512, device=DEVICE)
    keys = torch.zeros(1, 2, 8, 512, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 512"):
        tk.decode_attention_padded(q, keys, keys, None, 1.0)
    with pytest.raises(ValueError, match="GQA group 3"):
        tk.decode_attention_packed(q[..., :16], keys[0, 0, :, :16], keys[0, 0, :, :16],
                                   torch.zeros(1), torch.zeros(1), 3, 1.0)
    with pytest.raises(ValueError, match="q must be"):
        tk.decode_attention_padded(q[:, :3, :16], keys[..., :16], keys[..., :16], None, 1.0)
    with pytest.raises(ValueError, match="split_len"):
        tk.decode_attention_padded(q[..., :16], keys[..., :16], keys[..., :16], None, 1.0, split_len=10)


def test_triton_backend_selection_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.resolve_backend("torch", "cpu") == "torch"
    assert kernels.resolve_backend("auto", "cpu") == "torch"  # silently
    with pytest.warns(RuntimeWarning, match="need CUDA tensors"):
        assert kernels.resolve_backend("triton", "cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.resolve_backend("triton", "cpu") == "torch"  # warned once already
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernels.resolve_backend("cuda", "cpu")
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
    with pytest.warns(RuntimeWarning, match="triton is not installed"):
        assert kernels.resolve_backend("triton", "cuda") == "torch"


@pytest.mark.skipif(not INTERPRET, reason="checks the interpreter path")
def test_triton_backend_selection_uses_interpreted_kernels_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.resolve_backend("triton", "cpu") == "triton"
    q, keys, values, start, length, _ = random_packed(1, 2, 2, 16, torch.float32, [5, 70], seed=2)
    expected = reference.decode_attention_packed(q, keys, values, start, length, 2, 0.25)
    out = kernels.decode_attention_packed(q, keys, values, start, length, 2, 0.25, backend="triton")
    assert_close(out, expected, torch.float32)
    out = kernels.decode_attention_packed(q, keys, values, start, length, 2, 0.25, backend="auto")
    assert torch.equal(out, expected)  # "auto" never picks the interpreter: the reference ran


@pytest.mark.skipif(not INTERPRET, reason="the dry run is the CPU path")
def test_triton_kernels_benchmark_dry_run(capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "attention_kernels.py"
    spec = importlib.util.spec_from_file_location("benchmark_kernels", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert benchmark.main(["--dry-run", "--batches", "1", "--lengths", "20"]) == 0
    out = capsys.readouterr().out
    decode = [line.split() for line in out.splitlines() if line.startswith("    1      20 p")]
    assert [row[2:4] for row in decode] == [["packed", "triton"], ["packed", "torch"], ["padded", "triton"],
                                             ["padded", "sdpa"]]
    assert all(float(row[-1]) < 3e-2 for row in decode)  # bf16 against the float32 reference
    compaction = [line.split() for line in out.splitlines() if line.startswith("    1      20 t")]
    assert compaction and compaction[0][-1] == "yes"


@pytest.mark.gpu
@compiled_gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_decode_gpu_llama_shapes(dtype):
    """Llama-3.1-8B's attention shape (8 KV heads, G = 4, D = 128) at up to 8K ragged entries."""
    batch, heads, group, dim = 4, 8, 4, 128
    lengths = torch.randint(0, 8192, (batch * heads,), generator=torch.Generator().manual_seed(0))
    lengths[3] = 0
    q, keys, values, start, length, _ = random_packed(batch, heads, group, dim, dtype, lengths.tolist(), seed=1)
    out = tk.decode_attention_packed(q, keys, values, start, length, group, dim ** -0.5)
    expected = reference.decode_attention_packed(q, keys, values, start, length, group, dim ** -0.5)
    assert_close(out, expected, dtype)


@pytest.mark.gpu
@compiled_gpu_only
def test_triton_compact_gpu_llama_shapes():
    batch, heads, slots, dim = 2, 8, 8192, 128
    keys, values = (torch.randn(batch, heads, slots, dim, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    keep = torch.rand(batch, heads, slots, device=DEVICE) < 0.3
    got = tk.compact(keys, values, keep, 16)
    expected = reference.compact(keys, values, keep, 16)
    assert all(torch.equal(a, b) for a, b in zip(got[2:], expected[2:]))
    for s, n in zip(got[2].tolist(), got[3].tolist()):
        assert torch.equal(got[0][s:s + n], expected[0][s:s + n])
        assert torch.equal(got[1][s:s + n], expected[1][s:s + n])


def test_the_packed_cache_layer_decodes_with_the_triton_kernel():
    """kvbench.core.packed.PackedLayer with ``--kernels triton``: one decode step over unequal heads
    through the Triton kernel equals the PyTorch path (per-head SDPA over each segment)."""
    from kvbench.core.packed import PackedLayer

    generator = torch.Generator().manual_seed(11)
    heads, group, dim, length = 3, 2, 16, 40
    keys, values = torch.randn(2, 1, heads, length, dim, generator=generator).to(DEVICE)
    mask = (torch.rand(1, heads, length, generator=generator) < torch.tensor([0.9, 0.4, 0.1]).view(1, heads, 1))
    mask[..., 0] = True
    new_k, new_v = torch.randn(2, 1, heads, 1, dim, generator=generator).to(DEVICE)
    query = torch.randn(1, heads * group, 1, dim, generator=generator).to(DEVICE)
    outputs = []
    for backend in ("triton", "torch"):
        layer = PackedLayer(backend=backend)
        layer.update(keys, values)
        layer.keep(mask.to(DEVICE))
        layer.update(new_k, new_v)
        assert not layer.uniform
        outputs.append(layer.attend(query, 0.25))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-5, atol=2e-5)
