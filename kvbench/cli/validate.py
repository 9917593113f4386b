"""Checks of the command line's arguments and of the files they name, before anything loads or is written.

Each check raises :class:`~kvbench.errors.UsageError` with one line naming the argument and what it
expects; the CLI prints it and exits with code 2. They import nothing heavy, so a bad argument is
answered at once.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

from kvbench.errors import UsageError


def check_finite(flag: str, value: float, minimum: float | None = None, exclusive: bool = False) -> float:
    """A number that is not NaN or infinite (NaN compares false with everything, so it would slip past
    every later range check), and at least ``minimum`` (above it when ``exclusive``)."""
    if not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, not {value}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise UsageError(f"{flag} must be {'above' if exclusive else 'at least'} {minimum:g}, not {value:g}")
    return value


def _first_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """A results folder that exists or can be made, and can be written to."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} is a file; it takes a results folder")
    existing = _first_existing(out)
    if not existing.is_dir():
        raise UsageError(f"{flag} {out}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out}: {existing} is not writable")


def check_data_dir(data_dir: Path | None) -> None:
    if data_dir is not None and not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir} is not a folder (it takes the folder of a task's data files)")


def check_results_path(flag: str, path: Path) -> None:
    """A results folder or one parquet file (a folder not made yet is allowed: the leaderboard waits)."""
    if path.is_file() and path.suffix != ".parquet":
        raise UsageError(f"{flag} {path} is neither a results folder nor a .parquet file")


def check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port} is not a TCP port (1-65535)")


def check_address_free(address: str, port: int) -> None:
    """Bind ``address:port`` once, so an address in use is one line here and not streamlit's traceback."""
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UsageError(f"--address {address}: not an address of this machine ({err.strerror})") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(sockaddr)
        except OSError as err:
            raise UsageError(f"--address {address} --port {port}: cannot serve there ({err.strerror}); "
                             "pick another --port") from None


def _looks_like_path(data: str) -> bool:
    """A file name, not a hub id (``org/name[:config][@split]`` has one slash and no text suffix)."""
    return (data.startswith(("/", ".", "~")) or data.count("/") > 1
            or Path(data.partition("@")[0]).suffix in (".txt", ".jsonl", ".json", ".md"))


def check_train_data(data: str | None) -> None:
    """``kvbench train --data``: a readable text file, a JSONL file whose every line has a ``text``
    string, or a hub data set name (anything that looks like a path must exist)."""
    if data is None:
        return
    path = Path(data).expanduser()
    if path.is_dir():
        raise UsageError(f"--data {data} is a folder; it takes a text or .jsonl file, or a hub data set name")
    if not path.is_file():
        if _looks_like_path(data):
            raise UsageError(f"--data {data} does not exist (a text or .jsonl file, or a hub data set name)")
        import importlib.util

        from kvbench.downloads import hub_problem

        if importlib.util.find_spec("datasets") is None:
            raise UsageError(f"--data {data}: not a file, and hub data sets need `pip install datasets`")
        if hub_problem():
            raise UsageError(f"--data {data}: not a file, and the hub data set cannot be fetched: {hub_problem()}")
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--data {data}: cannot read it as UTF-8 text ({type(err).__name__})") from None
    if not text.strip():
        raise UsageError(f"--data {data} is empty")
    if path.suffix != ".jsonl":
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UsageError(f"--data {data}: line {number} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UsageError(f"--data {data}: line {number} has no \"text\" string (each JSONL line needs one)")
