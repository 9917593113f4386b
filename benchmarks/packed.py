"""Decode time and memory of the packed per-head cache against the padded one and a uniform cache.

One context of the default model is prefilled and scored once by gated (Fast KVzip's gates); the
scores are cut at one ratio into:

- ``uniform``: uniform allocation (every head keeps the same count): the reference the packed
  layout is held to, same number of entries;
- ``packed``: global allocation (heads keep very different counts) in the packed layout, with
  several ``decode_slack`` values (0: every decoded token repacks the layer);
- ``padded``: global allocation in the padded layout (every head as long as its layer's fullest).

Each cell answers the same question greedily for ``--tokens`` tokens; the cells are timed in
interleaved rounds and the median ms/token is compared with the uniform cell's, in one run, so the
ratios hold even on a loaded machine (the machine's load is printed with the timings).

    python benchmarks/packed.py [--length 1024] [--ratio 0.7] [--tokens 48] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import replace

import torch

from kvbench.core import attention
from kvbench.core.budget import Budget
from kvbench.core.prompts import split_prompt
from kvbench.core.session import Session
from kvbench.models import load_model
from kvbench.plugins import get_method, get_task

SLACKS = (0, 8, 32, 128)


def uptime() -> str:
    with open("/proc/loadavg") as f:
        return "load average " + " ".join(f.read().split()[:3])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, log=lambda *_: None)
    model = loaded.model
    attention.install(model)
    sample = next(get_task("ruler").samples(["niah_single_2"], 1, loaded.tokenizer, args.length, seed=0))
    prompt = split_prompt(loaded.tokenizer, sample.context, sample.chat_template)
    context = torch.tensor([prompt.context_ids], device=loaded.device)
    question = loaded.tokenizer.encode(" What is the special magic number?", add_special_tokens=False)

    gated = get_method("gated")
    gated.setup(model, loaded.tokenizer)
    sessions = {layout: Session(model, eos_ids=set(), layout=layout) for layout in ("packed", "padded")}
    packed_prefill = sessions["packed"].prefill(context, [gated])
    scored = sessions["packed"].score(packed_prefill, gated)
    padded_prefill = sessions["padded"].prefill(context, [gated])
    cells = {}
    cells["uniform"] = sessions["packed"].cut(
        packed_prefill, replace(scored, method=get_method("gated", allocation="uniform")), Budget(args.ratio, "uniform"))
    for slack in SLACKS:
        cell = sessions["packed"].cut(packed_prefill, scored, Budget(args.ratio, "global"))
        for layer in cell.cache.layers:
            layer.decode_slack = slack
        cells[f"packed slack {slack}"] = cell
    cells["padded"] = sessions["padded"].cut(padded_prefill, scored, Budget(args.ratio, "global"))
    del packed_prefill, padded_prefill

    print(f"# python benchmarks/packed.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"model {args.model} ({loaded.dtype}, {loaded.device}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores), {context.shape[1]} context tokens, gated at ratio {args.ratio}, "
          f"{args.tokens} decoded tokens x {args.rounds} interleaved rounds, torch {torch.__version__}")
    print(f"before: {uptime()}\n")
    print(f"{'cell':18s} {'entries':>8s} {'physical/full':>13s} {'physical/kept':>13s}")
    for name, cell in cells.items():
        print(f"{name:18s} {cell.cache.entries():8d} {cell.kv_bytes_physical / cell.kv_bytes_full:13.3f} "
              f"{cell.kv_bytes_physical / cell.kv_bytes_kept:13.3f}")

    times: dict[str, list[float]] = {name: [] for name in cells}
    answers: dict[str, list[int]] = {}
    peaks: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, cell in cells.items():
            answer = sessions["padded" if name == "padded" else "packed"].answer(cell, question, args.tokens)
            times[name].append(answer.seconds / max(len(answer.tokens), 1))
            answers[name], peaks[name] = answer.tokens, cell.cache.peak_bytes  # decoding's high-water mark
    base = statistics.median(times["uniform"])
    print(f"\n{'cell':18s} {'ms/token':>9s} {'/uniform':>9s} {'decode peak/kept':>16s} {'same tokens':>11s}")
    for name, cell in cells.items():
        median = statistics.median(times[name])
        same = "yes" if answers[name] == answers["packed slack 32"] else "no"
        print(f"{name:18s} {1000 * median:9.1f} {median / base:9.2f} {peaks[name] / cell.kv_bytes_kept:16.3f} "
              f"{same:>11s}")
    print(f"\nafter: {uptime()}")


if __name__ == "__main__":
    main()
