"""The ``kvbench`` command line: argument parsing (``parser``) and one call per command (``commands``).

Heavy imports (torch, transformers, streamlit) wait until a command needs them, so ``kvbench --help``
and argument errors answer at once. Bad input is one line on stderr and exit code 2, before anything
is written.
"""

from __future__ import annotations

import sys

from kvbench.cli import commands
from kvbench.cli.parser import build_parser
from kvbench.errors import UsageError


def _error(err: Exception) -> int:
    """Report bad input as one line on stderr; exit code 2."""
    print(f"kvbench: error: {str(err).strip()}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's own arguments
            return commands.lm_eval(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command in ("run", "sweep"):
            return commands.run(args, argv)
        if args.command == "list":
            return commands.list_(args.what, args.data_dir)
        if args.command == "leaderboard":
            return commands.leaderboard(args.results, args.port, args.address, args.print_command)
        if args.command == "check":
            return commands.check(args)
        if args.command == "report":
            return commands.report(args.results, args.format, args.out)
        if args.command == "rescore":
            return commands.rescore(args.results, args.dry_run)
        if args.command == "summary":
            return commands.summary(args)
        if args.command == "train":
            return commands.train(args, argv)
        return commands.import_lm_eval(args)
    except UsageError as err:
        return _error(err)
