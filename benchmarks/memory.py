"""KV memory of eviction on the default model: allocations, ratios, one-shot vs chunked-prefill eviction.

Prints, for one long RULER context, ratios measured in one run on one machine:
  1. per allocation (uniform, layer, global) and ratio: kv_bytes_physical / full, the padding
     overhead (physical − kept) / kept, and the measured ratio — snapkv and h2o scores;
  2. per ratio: peak KV memory (cache high-water mark plus attention inputs held for scoring)
     relative to the full cache's, for one-shot eviction after prefill and for eviction after every
     prefill chunk — h2o and window.

    python benchmarks/memory.py [--length 4096] [--chunk 512] [--model smollm2-135m] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import replace

import torch

from kvbench.core import attention
from kvbench.core.budget import Budget
from kvbench.core.prompts import split_prompt
from kvbench.core.session import Session
from kvbench.models import load_model
from kvbench.plugins import get_method, get_task

RATIOS = (0.0, 0.25, 0.5, 0.75, 0.9)
ALLOCATIONS = ("uniform", "layer", "global")


def context_ids(loaded, length: int) -> torch.Tensor:
    sample = next(get_task("ruler").samples(["niah_single_2"], 1, loaded.tokenizer, length, seed=0))
    ids = split_prompt(loaded.tokenizer, sample.context, sample.chat_template).context_ids
    return torch.tensor([ids], device=loaded.device)


def score_once(session, context, name):
    """Prefill and score once; the scores serve every allocation and ratio (they do not depend on them)."""
    method = get_method(name)
    prefill = session.prefill(context, [method])
    scored = session.score(prefill, method)
    return prefill, scored


def cut(session, prefill, scored, name, allocation, ratio):
    """The same scores cut under another allocation (scores do not depend on it)."""
    method = get_method(name, allocation=allocation)
    return session.cut(prefill, replace(scored, method=method), Budget(ratio, allocation)).cache


def chunked(session, context, name, ratio):
    method = get_method(name)
    return session.compress(context, method, Budget(ratio, method.allocation), evict_during_prefill=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    loaded = load_model(args.model, device=args.device, log=lambda *_: None)
    model = loaded.model
    attention.install(model)
    session = Session(model, prefill_chunk=args.chunk)
    context = context_ids(loaded, args.length)
    total = context.shape[1]
    full_bytes = session.prefill(context).cache.nbytes
    device = torch.cuda.get_device_name() if loaded.device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"model {args.model}, {total} context tokens, {loaded.dtype}, {device}, torch {torch.__version__}")
    print(f"full cache: {full_bytes / 2**20:.1f} MiB of keys and values\n")

    print("1. Physical KV bytes after one-shot eviction, relative to the full cache")
    print(f"{'method':8s} {'allocation':10s} {'ratio':>5s} {'measured':>8s} {'physical/full':>13s} "
          f"{'1-ratio':>7s} {'padding/kept':>12s}")
    one_shot_peak = {}
    for name in ("snapkv", "h2o", "window"):
        prefill, scored = score_once(session, context, name)
        one_shot_peak[name] = scored.peak_bytes  # the full prefill and the method's own state, whatever the ratio
        if name == "window":
            continue
        for allocation in ALLOCATIONS:
            for ratio in RATIOS:
                cell = cut(session, prefill, scored, name, allocation, ratio)
                full_entries = total * sum(layer.keys.shape[1] for layer in cell.layers)
                measured = 1 - cell.entries() / full_entries
                padding = (cell.nbytes - cell.kept_bytes()) / cell.kept_bytes()
                print(f"{name:8s} {allocation:10s} {ratio:5.2f} {measured:8.3f} {cell.nbytes / full_bytes:13.3f} "
                      f"{1 - ratio:7.2f} {padding:12.3%}", flush=True)
        del prefill, scored

    print("\n2. Peak KV memory relative to the full cache: one-shot vs eviction every prefill chunk")
    print(f"(chunk {args.chunk}; peak = cache high-water mark + the method's state and attention inputs)")
    print(f"{'method':8s} {'ratio':>5s} {'one-shot':>8s} {'chunked':>8s} {'chunked/one-shot':>16s}")
    for name in ("h2o", "window"):
        for ratio in RATIOS:
            chunk_peak = chunked(session, context, name, ratio).peak_bytes
            print(f"{name:8s} {ratio:5.2f} {one_shot_peak[name] / full_bytes:8.3f} {chunk_peak / full_bytes:8.3f} "
                  f"{chunk_peak / one_shot_peak[name]:16.3f}", flush=True)


if __name__ == "__main__":
    main()
