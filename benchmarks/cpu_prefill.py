"""Two questions about prefilling on the CPU this runs on, answered on the default model.

1. Which dtype: the prefill of a 1,024-token context (``logits_to_keep=1``) and one greedy step after
   it, in float32 and in bfloat16. kvbench's CPU default is bfloat16 with AVX-512 and float32
   without (:data:`kvbench.models.CPU_DEFAULT_DTYPE`); this shows what the other choice would cost.
2. Whether prefilling several contexts in one batch (what a ``--batch-size`` would do) saves time:
   ``B`` contexts of 1,024 tokens one at a time against one forward of batch ``B``, in float32.

Plain forwards of the Hugging Face model (no kvbench hooks), medians of ``--repeats``. Prints the
command, date, ``uptime`` before and after, and the CPU's vector capability.

    python benchmarks/cpu_prefill.py [--batches 2,4] [--out benchmarks/cpu_prefill.txt]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from kvbench.models import load_model
from recorded_output import finish, uptime


def median_s(work, repeats: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batches", default="2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/cpu_prefill.txt"))
    args = parser.parse_args()
    before = uptime()
    generator = torch.Generator().manual_seed(0)
    lines = [
        f"# python {shlex.join(['benchmarks/cpu_prefill.py', *sys.argv[1:]])}",
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; uptime before: {before}",
        f"machine: {platform.machine()} {cpu_name()}, vector capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}; {args.model}",
        "",
        f"1. dtype: prefill of {args.length} tokens and one greedy step after it (median of {args.repeats})",
        f"{'dtype':>9} {'prefill s':>10} {'step ms':>8}",
    ]
    ids = torch.randint(100, 10_000, (1, args.length), generator=generator)
    models = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(args.model, "cpu", dtype, log=lambda *_: None).model
        models[dtype] = model
        prefill = median_s(lambda: model(ids, use_cache=True, logits_to_keep=1), args.repeats)
        out = model(ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)

        def step() -> None:
            model(token, past_key_values=out.past_key_values, use_cache=True)
            out.past_key_values.crop(-1)  # drop the step's entry: the same cache length at every repeat

        lines.append(f"{dtype:>9} {prefill:10.2f} {1e3 * median_s(step, args.repeats):8.1f}")
    lines += ["", f"2. {args.length}-token contexts prefilled one at a time vs as one batch (float32, "
                  f"median of {args.repeats})",
              f"{'B':>3} {'one at a time s':>16} {'one batch s':>12} {'ratio':>6}"]
    model = models["float32"]
    for rows in (int(b) for b in args.batches.split(",")):
        many = torch.randint(100, 10_000, (rows, args.length), generator=generator)
        apart = median_s(lambda: [model(many[r:r + 1], use_cache=True, logits_to_keep=1) for r in range(rows)],
                         args.repeats)
        together = median_s(lambda: model(many, use_cache=True, logits_to_keep=1), args.repeats)
        lines.append(f"{rows:3d} {apart:16.2f} {together:12.2f} {apart / together:6.2f}")
    finish(lines, args.out)


if __name__ == "__main__":
    main()
