"""One sweep against the reference harness's way, on the same grid, timed in one run on one machine.

(a) ``kvbench sweep``: one process, the model loaded once, one prefill per context serving every
    (method, ratio) cell and the full baseline;
(b) the reference way: a fresh process per (method, ratio) — and one for the full baseline — each
    loading the model and prefilling every context again.

Both write parquet; the script checks that they agree cell by cell and prints the wall-clock times
and their ratio (b)/(a).

    python benchmarks/sweep.py [--methods window,snapkv,h2o] [--ratios 0.25,0.5,0.75,0.9] [--samples 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvbench.results import read_results

CELL = ["sample_id", "question_id", "method", "target_ratio"]


def kvbench(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "kvbench.cli", *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="window,snapkv,h2o")
    parser.add_argument("--ratios", default="0.25,0.5,0.75,0.9")
    parser.add_argument("--task", default="ruler:niah_single_1")
    parser.add_argument("--samples", default="4")
    parser.add_argument("--length", default="1024")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    common = ["--task", args.task, "--samples", args.samples, "--length", args.length, "--model", args.model]
    methods, ratios = args.methods.split(","), args.ratios.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        swept, separate = Path(tmp) / "sweep", Path(tmp) / "separate"
        kvbench("list", "methods")  # warm the file cache and the model conversion outside the timings
        start = time.perf_counter()
        kvbench("sweep", "--methods", args.methods, "--ratios", args.ratios, "--out", str(swept), *common)
        sweep_s = time.perf_counter() - start

        start = time.perf_counter()
        kvbench("run", "--method", "full", "--ratio", "0", "--out", str(separate), *common)
        for method in methods:
            for ratio in ratios:
                kvbench("run", "--method", method, "--ratio", ratio, "--no-baseline", "--out", str(separate), *common)
        separate_s = time.perf_counter() - start

        a = read_results(swept).set_index(CELL).sort_index()
        b = read_results(separate).set_index(CELL).sort_index()
        same = a["prediction"].equals(b["prediction"]) and a["score"].equals(b["score"])

    print(f"machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"grid: {len(methods)} methods × {len(ratios)} ratios + full, {args.task}, {args.samples} samples per "
          f"subtask, {args.length} tokens, {args.model}: {len(a)} rows")
    print(f"(a) kvbench sweep, one process:            {sweep_s:7.1f} s")
    print(f"(b) one process per (method, ratio) cell:  {separate_s:7.1f} s")
    print(f"speed-up (b)/(a): {separate_s / sweep_s:.2f}x; predictions and scores identical: {same}")


if __name__ == "__main__":
    main()
