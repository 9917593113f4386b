"""KV memory of eviction on the default model: allocations, ratios, one-shot vs chunked-prefill eviction.

Prints, for one long RULER context, ratios measured in one run on one machine:
  1. per method, allocation (uniform, layer, global) and ratio: the measured ratio,
     kv_bytes_physical / full, and kv_bytes_physical / kv_bytes_kept in the padded layout (every
     head as long as its layer's fullest: the layout before the packed one) and in the packed
     layout (the default: heads back to back), the same scores cut from both;
  2. per ratio: peak KV memory (cache high-water mark plus attention inputs held for scoring)
     relative to the full cache's, for one-shot eviction after prefill and for eviction after every
     prefill chunk — h2o and window;
  3. per method, at ratio 0.5: the peak of its one-shot compression (prefill, scoring, cut) against
     the full cache's peak and against the full peak plus one prefill chunk's attention inputs at
     every layer (``peak_per_method``).

    python benchmarks/memory.py [--length 4096] [--chunk 512] [--model smollm2-135m] [--device cpu] [--sections all|1|peaks]
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
PHYSICAL_RATIOS = (0.25, 0.5, 0.7, 0.75, 0.9)
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


def chunked(session, context, name, ratio):
    method = get_method(name)
    return session.compress(context, method, Budget(ratio, method.allocation), evict_during_prefill=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--device", default=None)
    parser.add_argument("--sections", choices=["all", "1", "peaks"], default="all",
                        help="1: only the physical/kept table (the other sections take much longer); "
                             "peaks: only sections 2 and 3")
    parser.add_argument("--methods", default=None, help="section 1: these methods (comma-separated; default all)")
    args = parser.parse_args()

    loaded = load_model(args.model, device=args.device, log=lambda *_: None)
    model = loaded.model
    attention.install(model)
    session = Session(model, prefill_chunk=args.chunk)
    padded_session = Session(model, prefill_chunk=args.chunk, layout="padded")
    context = context_ids(loaded, args.length)
    from kvbench.core.prompts import Layout, template_prefix_length
    layout = Layout(template_prefix_length(loaded.tokenizer, context[0].tolist()))
    total = context.shape[1]
    full_bytes = session.prefill(context).cache.full_bytes(context.shape[1])
    device = torch.cuda.get_device_name() if loaded.device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"model {args.model}, {total} context tokens, {loaded.dtype}, {device}, torch {torch.__version__}")
    print(f"full cache: {full_bytes / 2**20:.1f} MiB of keys and values\n")

    if args.sections != "peaks":
        physical_per_method(loaded, args.chunk, context, padded_session, layout,
                            args.methods.split(",") if args.methods else None)
    if args.sections == "1":
        return
    one_shot_peak = {}
    for name in ("h2o", "window"):
        prefill, scored = score_once(session, context, name)
        one_shot_peak[name] = scored.peak_bytes  # the full prefill and the method's own state, whatever the ratio
        del prefill, scored

    print("\n2. Peak KV memory relative to the full cache: one-shot vs eviction every prefill chunk")
    print(f"(chunk {args.chunk}; peak = cache high-water mark + the method's state and attention inputs)")
    print(f"{'method':8s} {'ratio':>5s} {'one-shot':>8s} {'chunked':>8s} {'chunked/one-shot':>16s}")
    for name in ("h2o", "window"):
        for ratio in RATIOS:
            chunk_peak = chunked(session, context, name, ratio).peak_bytes
            print(f"{name:8s} {ratio:5.2f} {one_shot_peak[name] / full_bytes:8.3f} {chunk_peak / full_bytes:8.3f} "
                  f"{chunk_peak / one_shot_peak[name]:16.3f}", flush=True)
    peak_per_method(loaded, session, context, args.chunk)


# -- 1. physical bytes over kept bytes, padded layout (before) and packed layout (after) ---------------


def physical_per_method(loaded, chunk: int, context: torch.Tensor, padded_session: Session, layout,
                        names: list[str] | None = None) -> None:
    """Section 1: every method that evicts by scores, scored once on a packed prefill; the same scores
    cut under each allocation and ratio from that prefill (packed layout) and from a padded prefill
    of the same context (padded layout: the layout before the packed one). Threshold methods: one
    cell at their τ."""
    from kvbench.plugins import list_methods, make_method

    packed_session = Session(loaded.model, prefill_chunk=chunk, layout="packed")
    padded_prefill = padded_session.prefill(context, layout=layout)
    print("1. Physical KV bytes over kept bytes after one-shot eviction: padded layout (every head as long as "
          "its layer's fullest, plus a mask) and packed layout (heads back to back, per-head offsets)")
    print(f"{'method':26s} {'allocation':10s} {'ratio':>5s} {'measured':>8s} {'physical/full':>13s} "
          f"{'padded/kept':>11s} {'packed/kept':>11s}")
    worst = (0.0, "")
    for name in names or list_methods():
        if name == "full" or make_method(name).manages_cache:
            continue
        method = make_method(PEAK_SPECS.get(name, name))
        method.setup(loaded.model, loaded.tokenizer)
        prefill = packed_session.prefill(context, [method], layout=layout)
        scored = None if method.ratio_dependent() else packed_session.score(prefill, method)
        cells = [(a, r) for a in ALLOCATIONS for r in ((None,) if method.threshold_mode else PHYSICAL_RATIOS)]
        for allocation, ratio in cells:
            try:
                cut_method = make_method(PEAK_SPECS.get(name, name), allocation=allocation)
            except ValueError as err:  # an allocation the method refuses (pyramidkv: no global)
                print(f"{method.spec():26s} {allocation:10s} refused: {err}")
                continue
            cut_method.setup(loaded.model, loaded.tokenizer)
            if method.ratio_dependent():
                scored = packed_session.score(prefill, method, Budget(ratio, allocation))
            budget = Budget(ratio, allocation)
            cuts = [session.cut(source, replace(scored, method=cut_method), budget)
                    for session, source in ((packed_session, prefill), (padded_session, padded_prefill))]
            packed, padded = cuts
            if packed.kv_bytes_kept != padded.kv_bytes_kept:
                raise AssertionError(f"{name}: the layouts kept different entries")
            over = packed.kv_bytes_physical / packed.kv_bytes_kept
            worst = max(worst, (over, f"{method.spec()} {allocation} {ratio}"))
            shown = "tau" if ratio is None else f"{ratio:.2f}"
            print(f"{method.spec():26s} {allocation:10s} {shown:>5s} {packed.eviction.measured_ratio:8.3f} "
                  f"{packed.kv_bytes_physical / packed.kv_bytes_full:13.3f} "
                  f"{padded.kv_bytes_physical / padded.kv_bytes_kept:11.3f} {over:11.4f}", flush=True)
            del cuts, packed, padded
        del prefill, scored
    print(f"largest packed physical/kept: {worst[0]:.4f} ({worst[1]}); "
          f"{'every cell within 1.05' if worst[0] <= 1.05 else 'OVER 1.05'}\n")


# -- 3. every method's one-shot peak against the full cache's ---------------------------------------

PEAK_RATIO = 0.5
PEAK_SPECS = {"finch": "finch:window_size=64"}  # a query-agnostic context has no question for finch's window


def peak_per_method(loaded, session: Session, context: torch.Tensor, chunk: int) -> None:
    """Section 3: each method alone, one-shot at ratio 0.5 (threshold methods at their τ), as
    ``kvbench run`` compresses a context: the peak (CPU: the KV high-water mark plus the method's
    state and recorded attention inputs; CUDA: every allocation) against the full cache's, and
    against the bound the pipeline promises, the full peak plus one prefill chunk's attention inputs
    at every layer. Methods over it are named with the reason."""
    from kvbench.core.method import Method
    from kvbench.core.prompts import Layout, template_prefix_length
    from kvbench.plugins import list_methods, make_method

    model = loaded.model
    layout = Layout(template_prefix_length(loaded.tokenizer, context[0].tolist()))  # protected, as kvbench run does
    full = session.full(session.prefill(context, layout=layout), get_method("full"))
    full_peak, kind = session.peak(full.peak_bytes)
    del full
    width = next(model.parameters()).element_size()
    chunk_inputs = min(chunk, context.shape[1]) * model.config.hidden_size * model.config.num_hidden_layers * width
    bound = full_peak + chunk_inputs
    print(f"\n3. Peak memory of one-shot compression at ratio {PEAK_RATIO} ({kind}), relative to the full cache's")
    print(f"full peak {full_peak / 2**20:.1f} MiB; bound = full + one chunk ({chunk} tokens) of attention inputs at "
          f"every layer = {bound / full_peak:.3f} x full")
    print(f"{'method':26s} {'measured':>8s} {'peak MiB':>9s} {'peak/full':>9s} {'<= bound':>8s}")
    over = []
    for name in list_methods():
        if name == "full":
            continue
        method = make_method(PEAK_SPECS.get(name, name))
        method.setup(model, loaded.tokenizer)
        budget = Budget(None if method.threshold_mode else PEAK_RATIO, method.allocation)
        compressed = session.compress(context, method, budget, layout=layout)
        peak, _ = session.peak(compressed.peak_bytes)
        within = peak <= bound
        print(f"{method.spec():26s} {compressed.eviction.measured_ratio:8.3f} {peak / 2**20:9.1f} "
              f"{peak / full_peak:9.3f} {'yes' if within else 'NO':>8s}", flush=True)
        if not within:
            if type(method).score_cache is not Method.score_cache:
                why = "its own scoring forward passes (KVzip's repeat pass: the repeated chunk's K/V and rows)"
            elif method.hidden_window() is None and not method.incremental:
                why = "it scores the whole prompt at once, so every layer's attention inputs are held until then"
            elif method.manages_cache:
                why = "it keeps residual checkpoints beside the live K/V"
            else:
                why = "unexplained: a regression"
            over.append(f"  {method.spec()}: {why}")
        del compressed
    print("every method within the bound" if not over else "over the bound:\n" + "\n".join(over))


if __name__ == "__main__":
    main()
