"""One decoding step of a stacked batch on the default model: SDPA against kvbench's CPU decode
attention (:mod:`kvbench.kernels.grouped`), by batch size.

A 1,024-token context is prefilled once; its full cache is stacked ``B`` times (the padded layout of
batched decoding, :func:`kvbench.core.batch.stack`) and one token is decoded for every row, with the
cache's ``decode_kernels`` set to ``"sdpa"`` or to ``"auto"`` (on the CPU: the grouped matmuls).
Prints the median wall time of a step and its share per row, with the command, date and ``uptime``.

    python benchmarks/decode_step.py [--batches 1,4,16,32] [--out benchmarks/decode_step.txt]
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

from kvbench.core import attention, batch, engine
from kvbench.core.session import Session
from kvbench.models import load_model
from recorded_output import finish, uptime


def step_ms(model, stacked, rows: int, position: int, repeats: int) -> float:
    token = torch.full((rows, 1), 500)
    engine.forward(model, stacked, token, position)  # warm-up; each step appends one entry per row
    times = []
    for k in range(repeats):
        began = time.perf_counter()
        engine.forward(model, stacked, token, position + 1 + k)
        times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batches", default="1,4,16,32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/decode_step.txt"))
    args = parser.parse_args()
    before = uptime()
    loaded = load_model(args.model, "cpu", args.dtype, log=lambda *_: None)
    attention.install(loaded.model)
    session = Session(loaded.model, 512, set())
    ids = torch.randint(100, 10_000, (1, args.length), generator=torch.Generator().manual_seed(0))
    cache = session.prefill(ids).cache
    lines = [
        f"# python {shlex.join(['benchmarks/decode_step.py', *sys.argv[1:]])}",
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; uptime before: {before}",
        f"machine: {platform.machine()} cpu, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; {args.model}, {args.dtype}, {args.length}-token cache stacked B times",
        "",
        f"{'B':>4} {'sdpa ms':>9} {'grouped ms':>11} {'sdpa/grouped':>13} {'grouped ms per row':>19}",
    ]
    for rows in (int(b) for b in args.batches.split(",")):
        timed = {}
        for kernels in ("sdpa", "auto"):
            stacked = batch.stack([cache] * rows, room=args.repeats + 1)
            stacked.decode_kernels = kernels
            timed[kernels] = step_ms(loaded.model, stacked, rows, args.length, args.repeats)
        lines.append(f"{rows:4d} {timed['sdpa']:9.1f} {timed['auto']:11.1f} {timed['sdpa'] / timed['auto']:13.2f} "
                     f"{timed['auto'] / rows:19.1f}")
    finish(lines, args.out)


if __name__ == "__main__":
    main()
