"""What every recorded benchmark output carries: the machine's load before and after the run (a
timing taken beside another heavy job is not a measurement), written beside the printed table."""

from __future__ import annotations

import subprocess
from pathlib import Path


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def finish(lines: list[str], out: Path) -> None:
    """Put the load after the run as the third line (after the command and the load before), then
    print the output and write it to ``out``."""
    lines.insert(2, f"# uptime after:  {uptime()}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out.write_text(text)
