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

import torch

from kvbench import attention, engine
from kvbench.methods import get_method
from kvbench.models import load_model
from kvbench.prompts import split_prompt
from kvbench.scoring import HiddenRecorder
from kvbench.tasks import get_task

RATIOS = (0.0, 0.25, 0.5, 0.75, 0.9)
ALLOCATIONS = ("uniform", "layer", "global")


def context_ids(loaded, length: int) -> torch.Tensor:
    sample = next(get_task("ruler").samples(["niah_single_2"], 1, loaded.tokenizer, length, seed=0))
    ids = split_prompt(loaded.tokenizer, sample.context, sample.chat_template).context_ids
    return torch.tensor([ids], device=loaded.device)


def score_once(model, context, chunk, name):
    """Prefill and score once; the scores serve every allocation and ratio (they do not depend on them)."""
    method = get_method(name)
    cache = engine.new_cache(model)
    recorder = HiddenRecorder(engine.attention_modules(model), method.hidden_window())
    engine.prefill(model, cache, context, 0, chunk)
    recorder.remove()
    scores = engine.score_layers(model, cache, method, recorder, context)
    return cache, scores, recorder.nbytes


def cut(cache, scores, name, allocation, ratio, total):
    cell = cache.clone()
    cell.retain_state(None)
    engine.evict(cell, scores, get_method(name, allocation=allocation), ratio, seen=total)
    return cell


def chunked(model, context, chunk, name, ratio):
    method = get_method(name)
    cache = engine.new_cache(model)
    reads_inputs = method.hidden_window() != 0
    recorder = HiddenRecorder(engine.attention_modules(model), None) if reads_inputs else None
    evictor = engine.Evictor(model, cache, method, ratio, recorder)
    engine.prefill(model, cache, context, 0, chunk, evictor)
    if recorder:
        recorder.remove()
    chunk_inputs = chunk * model.config.hidden_size * model.config.num_hidden_layers * model.dtype.itemsize
    chunk_inputs = chunk_inputs if reads_inputs else 0
    return cache, chunk_inputs


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
    context = context_ids(loaded, args.length)
    total = context.shape[1]
    full = engine.new_cache(model)
    engine.prefill(model, full, context, 0, args.chunk)
    full_bytes = full.nbytes
    device = torch.cuda.get_device_name() if loaded.device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"model {args.model}, {total} context tokens, {loaded.dtype}, {device}, torch {torch.__version__}")
    print(f"full cache: {full_bytes / 2**20:.1f} MiB of keys and values\n")

    print("1. Physical KV bytes after one-shot eviction, relative to the full cache")
    print(f"{'method':8s} {'allocation':10s} {'ratio':>5s} {'measured':>8s} {'physical/full':>13s} "
          f"{'1-ratio':>7s} {'padding/kept':>12s}")
    one_shot_peak = {}
    for name in ("snapkv", "h2o", "window"):
        cache, scores, held = score_once(model, context, args.chunk, name)
        one_shot_peak[name] = cache.peak_bytes + held  # the full prefill, whatever the ratio
        if name == "window":
            continue
        for allocation in ALLOCATIONS:
            for ratio in RATIOS:
                cell = cut(cache, scores, name, allocation, ratio, total)
                full_entries = total * sum(layer.keys.shape[1] for layer in cell.layers)
                measured = 1 - cell.entries() / full_entries
                padding = (cell.nbytes - cell.kept_bytes()) / cell.kept_bytes()
                print(f"{name:8s} {allocation:10s} {ratio:5.2f} {measured:8.3f} {cell.nbytes / full_bytes:13.3f} "
                      f"{1 - ratio:7.2f} {padding:12.3%}", flush=True)
        del cache, scores

    print("\n2. Peak KV memory relative to the full cache: one-shot vs eviction every prefill chunk")
    print(f"(chunk {args.chunk}; peak = cache high-water mark + attention inputs held for scoring)")
    print(f"{'method':8s} {'ratio':>5s} {'one-shot':>8s} {'chunked':>8s} {'chunked/one-shot':>16s}")
    for name in ("h2o", "window"):
        for ratio in RATIOS:
            cache, held = chunked(model, context, args.chunk, name, ratio)
            chunk_peak = cache.peak_bytes + held
            print(f"{name:8s} {ratio:5.2f} {one_shot_peak[name] / full_bytes:8.3f} {chunk_peak / full_bytes:8.3f} "
                  f"{chunk_peak / one_shot_peak[name]:16.3f}", flush=True)


if __name__ == "__main__":
    main()
