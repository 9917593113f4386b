"""The command line's arguments: one parser per command, defaults from ``kvbench.defaults``."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvbench.defaults import DEFAULT_MODEL, DEFAULT_TASK
from kvbench.errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage block): the CLI prints it and exits 2."""

    def error(self, message: str):
        raise UsageError(f"{message} (see: {self.prog} --help)")


def parse_ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number, not {text!r}") from None


def split_methods(text: str) -> list[str]:
    """``--methods``: comma-separated method specs, whose own options are comma-separated too:
    ``snapkv:window_size=32,kernel_size=7,gated`` is ``snapkv:window_size=32,kernel_size=7`` and
    ``gated`` (a piece with ``=`` and no ``:`` continues the spec before it)."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if specs and "=" in piece and ":" not in piece.split("=")[0]:
            specs[-1] += "," + piece
        elif piece:
            specs.append(piece)
    return specs


def _run_options(parser: argparse.ArgumentParser) -> None:
    """The options `run` and `sweep` share (defaults: :class:`kvbench.run.config.RunConfig`'s)."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder or Hugging Face id")
    parser.add_argument("--task", default=DEFAULT_TASK, help="TASK or TASK:SUB1,SUB2 (kvbench list tasks)")
    parser.add_argument("--length", type=int, default=1024, help="prompt length in model tokens (RULER)")
    parser.add_argument("--samples", type=int, default=4, help="samples per subtask")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with a task's data files (LongBench NAME.jsonl, gsm8k.jsonl); replaces other sources")
    parser.add_argument("--max-context", type=int, default=None,
                        help="LongBench/code: prompt tokens kept (middle truncation; default --length minus generation)")
    parser.add_argument("--query-aware", action="store_true", help="compress context and question together")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default per device)")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="tokens per prefill forward pass")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder (parquet)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the full-cache answers (token_match is then left empty)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--weights", type=Path, default=None,
                        help="learned method's weights (gated: gate .pt/.safetensors; kvzap: surrogate folder)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="kvzap: τ, evict entries outside the 128-token window whose predicted log KVzip+ "
                             "is below it (default -4, the reference's; the ratio is measured); simlayerkv: "
                             "its lazy-layer threshold")
    parser.add_argument("--allocation", default=None,
                        help="uniform, layer or global budget sharing (default: the method's own)")
    parser.add_argument("--evict-during-prefill", action="store_true",
                        help="evict after every prefill chunk so peak memory stays near the budget")
    parser.add_argument("--evict-during-decoding", action="store_true",
                        help="re-score and evict every --decode-interval generated tokens")
    parser.add_argument("--decode-interval", type=int, default=128, help="tokens between decode-time evictions")
    parser.add_argument("--cache-layout", choices=["packed", "padded"], default="packed",
                        help="packed: each layer's KV heads back to back, no padding (default); padded: every "
                             "head as long as the layer's fullest, plus a validity mask")
    parser.add_argument("--kernels", choices=["auto", "triton", "torch", "sdpa"], default="auto",
                        help="a decoded token's attention: the Triton kernel, its PyTorch reference, or SDPA "
                             "(auto: Triton on CUDA where it runs, else PyTorch)")
    parser.add_argument("--decode-batch", type=int, default=1,
                        help="cells (method, ratio) of one context decoded together as one batch, their caches "
                             "stacked and padded (1: one at a time; cells that evict while decoding always are)")
    _output_options(parser)


def _output_options(parser: argparse.ArgumentParser) -> None:
    """How a command reports: a progress bar and a summary table by default."""
    parser.add_argument("--quiet", action="store_true",
                        help="for scripts: no progress and no table, only the final line (and errors on stderr)")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as JSON on stdout (progress and notes go to stderr)")


def _check_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", type=Path, required=True, help="baseline results folder (parquet)")
    parser.add_argument("--candidate", type=Path, required=True, help="candidate results folder (parquet)")
    parser.add_argument("--tolerance", type=float, default=5.0,
                        help="points (0-100) a metric may drop beyond the bootstrap interval (default 5)")
    parser.add_argument("--metric", default="score", help="score and/or token_match, comma-separated")
    parser.add_argument("--memory-tolerance", type=float, default=0.10,
                        help="relative growth of kv_bytes_physical / peak_mem_bytes allowed (default 0.10)")
    parser.add_argument("--time-tolerance", type=float, default=1.0,
                        help="relative slow-down flagged, same device only (default 1.0 = twice as slow)")
    parser.add_argument("--strict-time", action="store_true", help="time regressions fail, not just warn")
    parser.add_argument("--format", choices=["text", "markdown", "json"], default="text")
    parser.add_argument("--output", type=Path, default=None,
                        help="also append the report to this file (e.g. $GITHUB_STEP_SUMMARY)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def _train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=["gated", "kvzap"])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder or Hugging Face id")
    parser.add_argument("--kind", choices=["linear", "mlp"], default="mlp", help="kvzap surrogate")
    parser.add_argument("--budget", choices=["paper", "standard", "quick"], default="paper",
                        help="recipe preset: the paper's (default), or smaller ones; deviations are recorded")
    parser.add_argument("--corpus", "--data", dest="corpus", default=None,
                        help="local text or .jsonl file, or folder of .txt/.md (default: Python's own "
                             "documentation text, disjoint from every task)")
    parser.add_argument("--text-field", default="text", help="the text's field in a .jsonl corpus")
    parser.add_argument("--chat-fraction", type=float, default=0.5,
                        help="share of texts prefilled inside the chat template, its tokens trained on")
    parser.add_argument("--texts", type=int, default=None, help="training texts (default: the budget's)")
    parser.add_argument("--validation", type=int, default=None, help="held-out texts for validation")
    parser.add_argument("--length", type=int, default=None, help="tokens per text (default: the budget's)")
    parser.add_argument("--steps", type=int, default=None, help="gated: optimisation steps")
    parser.add_argument("--batch", type=int, default=None, help="gated: tokens per step; kvzap mlp: batch")
    parser.add_argument("--positions", type=int, default=None, help="kvzap: sampled positions per text")
    parser.add_argument("--epochs", type=int, default=None, help="kvzap mlp: epochs")
    parser.add_argument("--hidden-dim", type=int, default=None, help="kvzap mlp: hidden width")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the reference's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: the kvbench cache, where runs look for weights)")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="steps between checkpoints; the same command again resumes from the last")
    parser.add_argument("--validate-every", type=int, default=100, help="steps between held-out losses")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="train from a checkout with uncommitted changes (recorded in the provenance)")
    parser.add_argument("--reason", default="", help="why the recipe deviates from the paper's (recorded)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kvbench", description="Benchmark KV-cache eviction methods.")
    sub = parser.add_subparsers(dest="command", required=True)
    single = sub.add_parser("run", help="evaluate one method at one compression ratio")
    _run_options(single)
    single.add_argument("--method", required=True,
                        help="eviction method spec: NAME or NAME:FIELD=VALUE,... (kvbench list methods)")
    single.add_argument("--ratio", type=parse_ratio, default=None,
                        help="fraction of the context KV evicted, in [0, 1) (threshold methods such as kvzap "
                             "measure theirs: leave it out)")
    sweep = sub.add_parser("sweep", help="methods × ratios from one prefill per context; resumable")
    _run_options(sweep)
    sweep.add_argument("--methods", required=True, help="comma-separated method specs; full is always included")
    sweep.add_argument("--ratios", required=True, help="comma-separated ratios in [0, 1)")
    sweep.add_argument("--shard", default=None,
                       help="INDEX/COUNT share of the samples (default: RANK/WORLD_SIZE or the Slurm array, else 0/1)")
    sweep.add_argument("--no-resume", action="store_true", help="do not skip rows already in --out")
    sweep.add_argument("--retry-errors", action="store_true",
                       help="run again the rows written with an error (default: keep them and say how many)")

    lister = sub.add_parser("list", help="list methods, tasks or models")
    lister.add_argument("what", choices=["methods", "tasks", "models"], nargs="?", default="methods")
    lister.add_argument("--data-dir", type=Path, default=None, help="tasks: check this data folder too")

    board = sub.add_parser("leaderboard", help="serve the Streamlit leaderboard of a results folder")
    board.add_argument("--results", type=Path, default=Path("results"), help="results folder (parquet)")
    board.add_argument("--port", type=int, default=8501, help="port to serve on")
    board.add_argument("--address", default="localhost", help="address to serve on (0.0.0.0: every interface)")
    board.add_argument("--print-command", action="store_true", help="print the streamlit command instead of running it")

    _check_options(sub.add_parser("check", help="compare a candidate results folder against a baseline; "
                                                "exit 1 on a regression"))
    report = sub.add_parser("report", help="a static report of a results folder: the leaderboard's table "
                                           "(Markdown) or table and plots (one self-contained HTML file)")
    report.add_argument("results", type=Path, help="results folder (parquet)")
    report.add_argument("--format", choices=["md", "html"], default="md")
    report.add_argument("--out", type=Path, default=None, help="file to write (default: standard output)")
    rescore = sub.add_parser("rescore", help="recompute every row's score from its stored prediction with the "
                                             "current metrics; part files rewritten atomically")
    rescore.add_argument("results", type=Path, help="results folder (parquet) or one part file")
    rescore.add_argument("--dry-run", action="store_true", help="say what would change, write nothing")
    _train_options(sub.add_parser("train", help="train a learned method's scorer (gated gates, kvzap surrogates)"))

    imp = sub.add_parser("import-lm-eval", help="turn an lm-eval run of --model kvbench (--log_samples) into rows")
    imp.add_argument("path", type=Path, help="results_<date>.json, samples_<task>_<date>.jsonl, or a folder of them")
    imp.add_argument("--out", type=Path, default=Path("results"), help="results folder (parquet)")
    imp.add_argument("--metric", default=None, help="lm-eval per-sample metric to score by (default: the first "
                                                    "higher-is-better one)")
    imp.add_argument("--filter", default=None, help="lm-eval filter to import (default: each task's first)")
    _output_options(imp)
    summary = sub.add_parser("summary", help="print the summary table of a results folder (as at the end of a run)")
    summary.add_argument("results", type=Path, nargs="?", default=Path("results"),
                         help="results folder or part file (default: results)")
    summary.add_argument("--json", action="store_true", help="print the summary as JSON")
    sub.add_parser("lm-eval", add_help=False, help="lm-eval's own command line with --model kvbench available "
                                                   "(lm-eval 0.4.13 discovers no plugins by itself)")
    return parser
