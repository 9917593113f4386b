"""Decode attention and compaction: kvbench's Triton kernels against its PyTorch path, on CUDA.

Shapes are Llama-3.1-8B's attention (8 KV heads, GQA group 4, head dim 128, bf16) at batch 1–32 and
4K–32K cache entries per head on average, per-head lengths ragged (uniform in 0.25–1.75× the mean,
as non-uniform budgets leave them). One decoder layer per call. Prints, per (batch, mean entries):

  1. decode attention, microseconds per call and effective bandwidth (bytes of real K/V entries read
     per second): the Triton kernel on the packed layout, the PyTorch reference on it (one segment at
     a time), the Triton kernel on the padded layout (every head padded to the longest), and masked
     SDPA on the padded layout (how kvbench's attention runs today), with each output's largest
     difference from the float32 reference;
  2. compaction of a padded layer keeping 30% of the entries with 64 slack rows: the Triton kernel
     against the per-head gather of the PyTorch reference.

    python benchmarks/attention_kernels.py [--batches 1,8,32] [--lengths 4096,16384,32768] [--out FILE]
    python benchmarks/attention_kernels.py --dry-run   # tiny shapes on the CPU in Triton's interpreter (CI)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

HEADS, GROUP, HEAD_DIM = 8, 4, 128  # Llama-3.1-8B
KEEP, SLACK = 0.3, 64


def ragged_lengths(batch: int, mean: int, generator: torch.Generator) -> torch.Tensor:
    factors = 0.25 + 1.5 * torch.rand(batch * HEADS, generator=generator)
    return (factors * mean).round().to(torch.int64)


def layer(batch: int, mean: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """One layer in both layouts holding the same entries: packed (heads back to back, no slack)
    and padded to the longest head with a validity mask."""
    length = ragged_lengths(batch, mean, torch.Generator().manual_seed(seed))
    generator = torch.Generator(device=device).manual_seed(seed)
    longest = int(length.max())
    shape = (batch, HEADS, longest, HEAD_DIM)
    keys = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    values = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    q = torch.randn(batch, HEADS * GROUP, HEAD_DIM, generator=generator, dtype=dtype, device=device)
    length = length.to(device)
    valid = (torch.arange(longest, device=device) < length.unsqueeze(1)).view(batch, HEADS, longest)
    start = torch.cumsum(length, 0) - length
    return q, keys[valid], values[valid], start, length, keys, values, valid  # keys[valid]: heads in order


def timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Microseconds per call: Triton's ``do_bench`` on CUDA (warm-up, cache flush, CUDA events),
    a median of wall-clock repeats elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: 1e3 * do_bench(fn, warmup=5, rep=max(25, 10 * repeats))

    def wall(fn):
        fn()
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        return 1e6 * statistics.median(times)

    return wall


def masked_sdpa(q, keys, values, valid, scale):
    """The padded path as kvbench's attention runs it: SDPA with a boolean mask, GQA enabled."""
    mask = valid.repeat_interleave(GROUP, dim=1).unsqueeze(2)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)


def decode_rows(batch: int, mean: int, dtype, device, time_us) -> list[str]:
    from kvbench.kernels import reference, triton_kernels

    q, packed_k, packed_v, start, length, keys, values, valid = layer(batch, mean, dtype, device)
    scale = HEAD_DIM ** -0.5
    max_length = keys.shape[2]
    truth = reference.decode_attention_packed(q.float(), packed_k.float(), packed_v.float(), start, length,
                                              GROUP, scale)
    real_bytes = 2 * packed_k.numel() * packed_k.element_size()
    cases = {
        "packed  triton": lambda: triton_kernels.decode_attention_packed(
            q, packed_k, packed_v, start, length, GROUP, scale, max_length=max_length),
        "packed  torch": lambda: reference.decode_attention_packed(q, packed_k, packed_v, start, length, GROUP, scale),
        "padded  triton": lambda: triton_kernels.decode_attention_padded(q, keys, values, valid, scale),
        "padded  sdpa": lambda: masked_sdpa(q, keys, values, valid, scale),
    }
    rows = []
    for name, fn in cases.items():
        error = (fn().float() - truth).abs().max().item()
        micros = time_us(fn)
        rows.append(f"{batch:5d} {mean:7d} {name:16s} {micros:11.1f} {real_bytes / micros / 1e3:9.1f} {error:10.2e}")
    return rows


def compact_rows(batch: int, mean: int, dtype, device, time_us) -> list[str]:
    from kvbench.kernels import reference, triton_kernels

    generator = torch.Generator(device=device).manual_seed(1)
    shape = (batch, HEADS, mean, HEAD_DIM)
    keys = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    values = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    keep = torch.rand(shape[:3], generator=generator, device=device) < KEEP
    expected = reference.compact(keys, values, keep, SLACK)
    got = triton_kernels.compact(keys, values, keep, SLACK)
    same = all(torch.equal(a, b) for a, b in zip(got[2:], expected[2:])) and all(
        torch.equal(got[i][s:s + n], expected[i][s:s + n])
        for i in (0, 1) for s, n in zip(got[2].tolist(), got[3].tolist()))
    rows = []
    for name, fn in {"triton": lambda: triton_kernels.compact(keys, values, keep, SLACK),
                     "torch": lambda: reference.compact(keys, values, keep, SLACK)}.items():
        rows.append(f"{batch:5d} {mean:7d} {name:8s} {time_us(fn):11.1f} {'yes' if same else 'NO':>6s}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", help="comma-separated (default 1,8,32; dry run 1,2)")
    parser.add_argument("--lengths", help="mean cache entries per KV head (default 4096,16384,32768; dry run 64)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per cell off CUDA")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, Triton interpreted")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    try:
        batches = [int(x) for x in (args.batches or ("1,2" if args.dry_run else "1,8,32")).split(",")]
        lengths = [int(x) for x in (args.lengths or ("64" if args.dry_run else "4096,16384,32768")).split(",")]
    except ValueError:
        print("attention_kernels.py: --batches and --lengths take comma-separated integers", file=sys.stderr)
        return 2
    if args.dry_run:
        # The interpreter must be chosen before triton is imported, and stay set while kernels run.
        os.environ["TRITON_INTERPRET"] = "1"
        device, repeats = torch.device("cpu"), 1
    elif not torch.cuda.is_available():
        print("attention_kernels.py: needs CUDA (or --dry-run for tiny shapes on the CPU)", file=sys.stderr)
        return 2
    else:
        device, repeats = torch.device("cuda"), args.repeats
    try:
        import triton
    except ImportError:
        print("attention_kernels.py: needs triton (pip install 'kvbench[test]')", file=sys.stderr)
        return 2

    dtype = getattr(torch, args.dtype)
    time_us = timer(device, repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, Triton interpreter (dry run)"
    lines = [
        f"# benchmarks/attention_kernels.py, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"# command: python {' '.join(['benchmarks/attention_kernels.py', *(argv if argv is not None else sys.argv[1:])])}",
        f"# device: {name}; torch {torch.__version__}, triton {triton.__version__}, {args.dtype}",
        f"# one layer: {HEADS} KV heads, group {GROUP}, head dim {HEAD_DIM}; per-head lengths 0.25-1.75x the mean",
        "",
        "## decode attention (one query token per row; GB/s = real K/V bytes / time; error vs float32 reference)",
        f"{'batch':>5s} {'mean':>7s} {'layout  backend':16s} {'us/call':>11s} {'GB/s':>9s} {'max |err|':>10s}",
    ]
    print("\n".join(lines), flush=True)
    for batch in batches:
        for mean in lengths:
            rows = decode_rows(batch, mean, dtype, device, time_us)
            print("\n".join(rows), flush=True)
            lines += rows
    header = ["", f"## compaction (keep {KEEP:.0%} of a padded layer, {SLACK} slack rows per head)",
              f"{'batch':>5s} {'length':>7s} {'backend':8s} {'us/call':>11s} {'equal':>6s}"]
    print("\n".join(header), flush=True)
    lines += header
    for batch in batches:
        for mean in lengths:
            rows = compact_rows(batch, mean, dtype, device, time_us)
            print("\n".join(rows), flush=True)
            lines += rows
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
