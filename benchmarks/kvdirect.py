"""KV-Direct on the default model, set against the paper's claims: token match, memory, decode cost.

The paper: residual checkpoints replace the KV cache with zero error; 100% token match at every
budget where H2O, StreamingLLM, SnapKV, TOVA and window-only eviction fall to 5–28%. Prints:

  1. token match with the full cache's greedy answers (kvbench's ``token_match``: the share of
     positions, up to the longer answer, where the two agree) of kvdirect, h2o, window and snapkv at
     ratios 0.25/0.5/0.75/0.9 — one ``kvbench sweep`` over RULER — and kvdirect again in float32;
  2. memory per token, a K/V entry against a residual, for the default model and, from their
     published configs alone, Llama-3.1-8B, Qwen3-8B and Gemma-3-4B;
  3. decode and prefill time per token of kvdirect against the full cache at two context lengths,
     as ratios measured in one run.

    python benchmarks/kvdirect.py [--samples 3] [--length 1024] [--lengths 1024,4096] [--tokens 32]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config

from kvbench.core import attention
from kvbench.plugins import get_method
from kvbench.models import load_model
from kvbench.results import read_results
from kvbench.core.budget import Budget
from kvbench.core.session import Session
from kvbench.run.config import RunConfig
from kvbench.run.execute import run
from memory import context_ids  # benchmarks/memory.py: a RULER context of a given length

METHODS = ["kvdirect", "h2o", "window", "snapkv"]
RATIOS = [0.25, 0.5, 0.75, 0.9]
TASK = "ruler:niah_single_1,niah_multikey_1,vt,fwe"

# The published config.json values that set the cache's shape (hub ids in the keys).
CONFIGS = {
    "meta-llama/Llama-3.1-8B": LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                           num_key_value_heads=8, head_dim=128),
    "Qwen/Qwen3-8B": Qwen3Config(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                                 num_key_value_heads=8, head_dim=128),
    "google/gemma-3-4b-it (text)": Gemma3TextConfig(hidden_size=2560, num_hidden_layers=34, num_attention_heads=8,
                                                   num_key_value_heads=4, head_dim=256, sliding_window=1024),
}


def token_match_table(samples: int, length: int, dtype: str | None, methods: list[str]) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):  # per-sample lines
        run(RunConfig(methods=methods, ratios=RATIOS, task=TASK, samples=samples, length=length, dtype=dtype,
                      out=Path(out)), log=lambda *_: None)
        frame = read_results(out)
    if frame["error"].notna().any():
        raise RuntimeError(f"rows with errors: {frame['error'].dropna().unique()[:3]}")
    frame["identical"] = frame["token_match"] == 1.0
    frame["physical/full"] = frame["kv_bytes_physical"] / frame["kv_bytes_full"]
    return frame


def print_token_match(frame: pd.DataFrame) -> None:
    table = frame[frame["method"] != "full"].pivot_table(index="target_ratio", columns="method",
                                                          values="token_match", aggfunc="mean")
    identical = frame[frame["method"] != "full"].pivot_table(index="target_ratio", columns="method",
                                                              values="identical", aggfunc="mean")
    score = frame.pivot_table(index="target_ratio", columns="method", values="score", aggfunc="mean")
    print("mean token_match (share of answers identical to the full cache's in brackets)")
    print(f"{'ratio':>5s} " + " ".join(f"{m:>16s}" for m in table.columns))
    for ratio in table.index:
        cells = [f"{table.loc[ratio, m]:7.3f} ({identical.loc[ratio, m]:5.1%})" for m in table.columns]
        print(f"{ratio:5.2f} " + " ".join(f"{c:>16s}" for c in cells))
    print(f"\nmean score (0-100); full cache: {frame.loc[frame['method'] == 'full', 'score'].mean():.1f}")
    print(f"{'ratio':>5s} " + " ".join(f"{m:>10s}" for m in table.columns))
    for ratio in table.index:
        print(f"{ratio:5.2f} " + " ".join(f"{score.loc[ratio, m]:10.1f}" for m in table.columns))


def per_token(name: str, config, dtype_bytes: int = 2) -> str:
    """One model's K/V and residual per token, per layer and over all layers, in bf16."""
    layers = config.num_hidden_layers
    kv = 2 * config.num_key_value_heads * config.head_dim  # values per token and layer
    residual = config.hidden_size
    sliding = sum(t == "sliding_attention" for t in (getattr(config, "layer_types", None) or []))
    kib = dtype_bytes / 1024
    line = (f"{name:36s} {layers:6d} {kv:8d} {residual:9d} {residual / kv:6.2f} {layers * kv * kib:8.1f} "
            f"{layers * residual * kib:8.1f} {residual * kib:7.1f} {residual / kv + 0.1:11.2f}")
    if sliding:
        line += (f"\n{'':36s} ({sliding} of {layers} layers attend to a {config.sliding_window}-token window: "
                 f"past it their K/V stops growing, while a residual per token would not)")
    return line


def decode_timing(loaded, lengths: list[int], tokens: int, repeats: int, chunk: int) -> None:
    model = loaded.model
    attention.install(model)
    session = Session(model, prefill_chunk=chunk, eos_ids=set())  # no end token: every answer is `tokens` long
    kvdirect, full = get_method("kvdirect"), get_method("full")
    print(f"{'context':>7s} {'cache':14s} {'prefill s':>9s} {'ms/token':>9s} {'decode/full':>11s} "
          f"{'prefill/full':>12s} {'physical/full':>13s}")
    for length in lengths:
        context = context_ids(loaded, length)
        total = context.shape[1]
        cells = {"full": session.full(session.prefill(context), full),
                 "kvdirect@0.5": session.compress(context, kvdirect, Budget(0.5)),
                 "kvdirect@0.9": session.compress(context, kvdirect, Budget(0.9))}
        decode = {label: [] for label in cells}
        for _ in range(repeats):  # interleaved, so drift in machine load hits every cache alike
            for label, cell in cells.items():
                answer = session.answer(cell, None, tokens)  # rolled back (full) or on a copy (kvdirect)
                decode[label].append(answer.seconds / (tokens - 1))  # the last token is chosen, not fed
        full_ms = statistics.median(decode["full"]) * 1e3
        for label, cell in cells.items():
            ms = statistics.median(decode[label]) * 1e3
            print(f"{total:7d} {label:14s} {cell.prefill_s:9.2f} {ms:9.1f} {ms / full_ms:11.2f} "
                  f"{cell.prefill_s / cells['full'].prefill_s:12.2f} "
                  f"{cell.kv_bytes_physical / cells['full'].kv_bytes_physical:13.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3, help="per RULER subtask")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--lengths", default="1024,4096", help="context lengths for the decode timing")
    parser.add_argument("--tokens", type=int, default=32, help="tokens decoded per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=512)
    args = parser.parse_args()

    loaded = load_model("smollm2-135m", log=lambda *_: None)
    device = torch.cuda.get_device_name() if loaded.device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"model smollm2-135m, {loaded.dtype}, {device}, torch {torch.__version__}\n")

    started = time.perf_counter()
    print(f"1. Token match on {TASK}, {args.length} tokens, {args.samples} samples per subtask "
          f"({loaded.dtype}, the CPU default)")
    frame = token_match_table(args.samples, args.length, None, METHODS)
    print_token_match(frame)
    kvd = frame[frame["method"] == "kvdirect"]
    print("kvdirect kv_bytes_physical / kv_bytes_full, by ratio: "
          + ", ".join(f"{r:g}: {v:.3f}" for r, v in kvd.groupby("target_ratio")["physical/full"].mean().items()))
    print(f"\n   kvdirect again in float32 ({len(kvd)} answers)")
    fp32 = token_match_table(args.samples, args.length, "float32", ["kvdirect"])
    fp32 = fp32[fp32["method"] == "kvdirect"]
    for ratio, group in fp32.groupby("target_ratio"):
        print(f"   ratio {ratio:.2f}: mean token_match {group['token_match'].mean():.3f}, "
              f"{group['identical'].mean():.1%} identical")
    print(f"   ({time.perf_counter() - started:.0f} s for section 1)\n")

    print("2. Memory per token: a K/V entry (2 x kv_heads x head_dim) against a residual (hidden_size)")
    print(f"{'model':36s} {'layers':>6s} {'kv/layer':>8s} {'res/layer':>9s} {'res/kv':>6s} {'KV KiB':>8s} "
          f"{'res KiB':>8s} {'one res':>7s} {'@0.9/full':>11s}")
    print("(kv/layer, res/layer: values per token and layer. KiB per token in bf16: 'KV' and 'res' over all\n"
          " layers, what kvdirect stores; 'one res' a single residual per token, the paper's checkpoint, from\n"
          " which K/V can be rebuilt only by running every layer over all checkpointed tokens again.\n"
          " '@0.9/full': kvdirect's bytes at ratio 0.9 relative to the full cache = res/kv + 0.1)")
    print(per_token("HuggingFaceTB/SmolLM2-135M-Instruct", loaded.model.config))
    for name, config in CONFIGS.items():
        print(per_token(name, config))

    print(f"\n3. Decode time per token (median of {args.repeats}, {args.tokens} tokens, greedy) and prefill "
          f"(chunk {args.chunk}), kvdirect against the full cache")
    decode_timing(loaded, [int(n) for n in args.lengths.split(",")], args.tokens, args.repeats, args.chunk)


if __name__ == "__main__":
    main()
