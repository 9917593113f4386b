"""The learned methods against their teacher on the default model: cost, agreement, accuracy.

For gated (Fast KVzip gates), kvzap (linear and MLP surrogates) and kvzip itself, on RULER contexts:

1. scoring overhead as a fraction of the prefill: (prefill while the method scores - plain prefill
   + scoring) / plain prefill, medians over contexts (Fast KVzip's target for its gates: under 5%);
2. agreement of each learned scorer's kept set with KVzip's under global allocation (one threshold
   over all layers and heads, the sinks left out) at ratios 0.5 and 0.7;
3. RULER scores of the three next to snapkv and the full cache at ratios 0.5 and 0.7, through the
   ordinary runner (``kvbench run``'s code path), each method with its default allocation; KVzap
   both as the paper runs it (``kvzap``, threshold τ = -4, ratio measured) and cut to each ratio
   (``kvzap_ratio``).

    python benchmarks/learned.py                 # prints, and writes benchmarks/learned.txt
    python benchmarks/learned.py --samples 2 --no-write
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from kvbench.core import attention
from kvbench.defaults import DEFAULT_TASK
from kvbench.plugins import get_method
from kvbench.defaults import DEFAULT_MODEL
from kvbench.models import load_model
from kvbench.core.prompts import split_prompt
from kvbench.results import read_results
from kvbench.core.session import Session
from kvbench.run.config import RunConfig, parse_task
from kvbench.run.execute import run
from kvbench.plugins import get_task
from kvbench.training import agreement

RATIOS = (0.5, 0.7)
SCORERS = {  # label → (method, options)
    "gated": ("gated", {}),
    "kvzap-linear": ("kvzap", {"kind": "linear"}),
    "kvzap-mlp": ("kvzap", {"kind": "mlp"}),
    "kvzip": ("kvzip", {}),
}


def contexts(tokenizer, task_spec: str, samples: int, length: int) -> list[torch.Tensor]:
    name, subtasks = parse_task(task_spec)
    task = get_task(name)
    out = []
    for sub in subtasks or task.subtasks():
        for sample in task.samples([sub], samples, tokenizer, length, 0):
            out.append(torch.tensor([split_prompt(tokenizer, sample.context, sample.chat_template).context_ids]))
    return out


def cost_and_agreement(loaded, ids_list, log) -> tuple[dict, dict]:
    model = loaded.model
    attention.install(model)
    session = Session(model, prefill_chunk=512)
    methods = {label: get_method(name, **opts) for label, (name, opts) in SCORERS.items()}
    overhead = {label: [] for label in methods}
    agree = {(label, r): [] for label in methods if label != "kvzip" for r in RATIOS}
    for i, ids in enumerate(ids_list):
        plain = statistics.median(session.prefill(ids).seconds for _ in range(3))
        scores = {}
        for label, method in methods.items():
            prefill = session.prefill(ids, [method])  # learned scorers score inside the forward
            scored = session.score(prefill, method)
            overhead[label].append((max(prefill.seconds - plain, 0.0) + scored.seconds) / plain)
            scores[label] = torch.stack([s[0, :, method.sinks:] for s in scored.scores])
        for label in methods:
            if label != "kvzip":
                for r in RATIOS:
                    agree[(label, r)].append(agreement([scores[label]], [scores["kvzip"]], r))
        log(f"[{i + 1}/{len(ids_list)}] {ids.shape[1]} tokens, prefill {plain:.2f}s, overhead "
            + ", ".join(f"{k} {v[-1]:.1%}" for k, v in overhead.items()))
    return ({k: statistics.median(v) for k, v in overhead.items()},
            {k: sum(v) / len(v) for k, v in agree.items()})


def ruler_scores(samples: int, length: int, task: str, log) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(methods=["snapkv", "kvzip", "gated", "kvzap_ratio", "kvzap"], ratios=list(RATIOS),
                           task=task, length=length, samples=samples, out=Path(tmp), command="benchmarks/learned.py")
        run(config, log=log)
        frame = read_results(Path(tmp))
    table = frame.groupby(["method", "target_ratio"], dropna=False).agg(  # kvzap's threshold cell has no ratio
        score=("score", "mean"), measured_ratio=("measured_ratio", "mean"), token_match=("token_match", "mean"),
        rows=("score", "size"), allocation=("allocation", "first"))
    return table.reset_index()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4, help="RULER samples per subtask")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--task", default=DEFAULT_TASK)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".txt"))
    args = parser.parse_args(argv)
    lines: list[str] = []

    def log(text: str = "") -> None:
        print(text, flush=True)

    started = time.perf_counter()
    loaded = load_model(DEFAULT_MODEL, log=log)
    ids_list = contexts(loaded.tokenizer, args.task, args.samples, args.length)
    overhead, agree = cost_and_agreement(loaded, ids_list, log)
    ruler = ruler_scores(args.samples, args.length, args.task, log)

    lines += [
        f"# benchmarks/learned.py on {DEFAULT_MODEL}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"# command: python {' '.join(['benchmarks/learned.py', *(argv if argv is not None else sys.argv[1:])])}",
        f"# device: {loaded.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}), dtype {str(loaded.dtype).removeprefix('torch.')}, "
        f"torch {torch.__version__}",
        f"# contexts: {len(ids_list)} RULER prompts ({args.task}) of {args.length} tokens; weights: shipped "
        "(methods/weights/smollm2-135m)",
        "",
        "## scoring overhead (median over contexts, fraction of a plain prefill)",
        *(f"{label:14s} {value:8.1%}" for label, value in overhead.items()),
        "",
        "## agreement with KVzip's kept set (global allocation, sinks excluded; mean over contexts)",
        f"{'scorer':14s} " + " ".join(f"ratio {r:<5g}" for r in RATIOS),
        *(f"{label:14s} " + " ".join(f"{agree[(label, r)]:<11.3f}" for r in RATIOS)
          for label in SCORERS if label != "kvzip"),
        "",
        "## RULER (score x100, mean over samples; MLP surrogates: kvzap at τ = -4 (target_ratio NaN: measured), "
        "kvzap_ratio cut to each ratio)",
        ruler.to_string(index=False, float_format=lambda v: f"{v:.3g}"),
        "",
        f"# total {time.perf_counter() - started:.0f} s",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_write:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
