"""Sweep throughput: the reference protocol, today's sweep, and the sweep with batched decoding.

On one grid (RULER niah_single_1 contexts, the default model, several methods and ratios), timed
in one run on one machine:

(a) the reference protocol: a fresh ``kvbench run`` process per (method, ratio) cell — and one for
    the full baseline — each loading the model and prefilling every context again;
(b) ``kvbench sweep --decode-batch 1``: one process, one prefill per context, cells answered one
    at a time;
(c) ``kvbench sweep --decode-batch 16``: the same, with a context's cells decoded as batches.

Prints the wall time of each, (a)/(c) and (b)/(c), the per-phase seconds summed from the rows
(prefill: each prefill once; scoring: every row's, so a method's one scoring counts in each of its
ratios' rows; decode: every row's — in (c) each row's share of its batch's wall time), and whether
(b) and (c) give the same predictions (rows that differ: bf16 rounding differs between a batch and
batch size 1). Writes the table, with the command, the date and ``uptime`` before and after, to
``--out``.

    python benchmarks/throughput.py [--contexts 20] [--out benchmarks/throughput.txt]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from kvbench.results import read_results

CELL = ["sample_id", "question_id", "method", "target_ratio"]
RATIO_METHODS = "snapkv,window,kvzip,h2o,gated"
THRESHOLD_METHODS = "kvzap"  # its threshold rule: one cell, ratio measured


def kvbench(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "kvbench.cli", *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def phases(frame) -> tuple[float, float, float]:
    """Prefill, scoring and decode seconds, each piece of work counted once. Rows sharing a prefill
    carry the same run, unit and seconds; a sweep scores a method once per unit and cuts every ratio
    from it, and each of its rows records that scoring plus its own cut, so a method's scoring is its
    largest row (the grid's methods all score independently of the ratio). Decode is per row."""
    prefill = frame.drop_duplicates(["run_id", "sample_id", "question_id", "prefill_s"])["prefill_s"].sum()
    scoring = frame.groupby(["run_id", "sample_id", "question_id", "method"])["scoring_s"].max().sum()
    return float(prefill), float(scoring), float(frame["decode_s"].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=20, help="RULER niah_single_1 contexts")
    parser.add_argument("--length", default="1024")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default=RATIO_METHODS, help="methods cut at every ratio")
    parser.add_argument("--threshold-methods", default=THRESHOLD_METHODS, help="methods at their threshold rule")
    parser.add_argument("--ratios", default="0.25,0.5,0.75,0.9")
    parser.add_argument("--decode-batch", default="16", help="(c)'s --decode-batch")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/throughput.txt"))
    args = parser.parse_args()
    common = ["--task", "ruler:niah_single_1", "--samples", str(args.contexts), "--length", args.length,
              "--model", args.model, "--dtype", args.dtype, *(["--device", args.device] if args.device else [])]
    ratio_methods = [m for m in args.methods.split(",") if m]
    threshold_methods = [m for m in args.threshold_methods.split(",") if m]
    ratios = args.ratios.split(",")
    every = ",".join(ratio_methods + threshold_methods)
    before = uptime()

    with tempfile.TemporaryDirectory() as tmp:
        out = {name: Path(tmp) / name for name in ("a", "b", "c")}
        kvbench("list", "methods")  # warm the file cache outside the timings
        kvbench("run", "--method", "window", "--ratio", "0.5", "--samples", "1", "--out", str(Path(tmp) / "warm"),
                *common[2:])  # and the model conversion and the task's data

        def reference() -> None:
            kvbench("run", "--method", "full", "--ratio", "0", "--decode-batch", "1", "--out", str(out["a"]), *common)
            for method in ratio_methods:
                for ratio in ratios:
                    kvbench("run", "--method", method, "--ratio", ratio, "--no-baseline", "--decode-batch", "1",
                            "--out", str(out["a"]), *common)
            for method in threshold_methods:
                kvbench("run", "--method", method, "--no-baseline", "--out", str(out["a"]), *common)

        def sweep(name: str, batch: str) -> None:
            kvbench("sweep", "--methods", every, "--ratios", args.ratios, "--decode-batch", batch,
                    "--out", str(out[name]), *common)

        seconds = {"a": timed(reference), "b": timed(lambda: sweep("b", "1")),
                   "c": timed(lambda: sweep("c", args.decode_batch))}
        frames = {name: read_results(path).set_index(CELL).sort_index() for name, path in out.items()}
    after = uptime()

    b, c = frames["b"], frames["c"]
    errors = {name: int(f["error"].notna().sum()) for name, f in frames.items()}
    flips = int((b["prediction"] != c["prediction"]).sum())
    token_flips = int((b["new_tokens"] != c["new_tokens"]).sum() + (b["token_match"].fillna(-1) != c["token_match"].fillna(-1)).sum())
    same_a_b = bool(frames["a"]["prediction"].equals(b["prediction"]))
    label = {"a": "(a) one process per (method, ratio) cell",
             "b": "(b) kvbench sweep --decode-batch 1",
             "c": f"(c) kvbench sweep --decode-batch {args.decode_batch}"}
    lines = [
        f"# python {shlex.join(['benchmarks/throughput.py', *sys.argv[1:]])}",
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; uptime before: {before}",
        f"# uptime after:  {after}",
        (f"machine: {platform.machine()} {args.device or ('cuda' if torch.cuda.is_available() else 'cpu')}, "
         f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"),
        (f"grid: {len(ratio_methods)} methods × {len(ratios)} ratios + {len(threshold_methods)} at threshold + full; "
         f"{args.contexts} RULER niah_single_1 contexts of {args.length} tokens; {args.model}, {args.dtype}; "
         f"{len(c)} rows"),
        "",
        f"{'protocol':<44} {'wall s':>8} {'prefill s':>10} {'scoring s':>10} {'decode s':>9} {'errors':>7}",
    ]
    split = {name: phases(frame.reset_index()) for name, frame in frames.items()}
    for name in ("a", "b", "c"):
        prefill, scoring, decode = split[name]
        lines.append(f"{label[name]:<44} {seconds[name]:8.1f} {prefill:10.1f} {scoring:10.1f} {decode:9.1f} "
                     f"{errors[name]:7d}")
    decode_c = split["c"][2]
    lines += [
        "",
        f"(a)/(c): {seconds['a'] / seconds['c']:.2f}x   (b)/(c): {seconds['b'] / seconds['c']:.2f}x",
        (f"(c) less its decoding (start-up, prefills, scoring): {seconds['c'] - decode_c:.1f} s, so even with "
         f"free decoding (a)/(c) would be at most {seconds['a'] / (seconds['c'] - decode_c):.2f}x"),
        (f"predictions (b) == (c): {flips == 0}; rows whose prediction differs: {flips} of {len(c)} "
         f"(rows whose new_tokens or token_match differ: {token_flips})"),
        f"predictions (a) == (b): {same_a_b}",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.out.write_text(text)


if __name__ == "__main__":
    main()
