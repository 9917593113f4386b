"""Checks of the command line's arguments and of the files they name, before anything loads or is written.

Each check raises :class:`~kvbench.errors.UsageError` with one line naming the argument and what it
expects; the CLI prints it and exits with code 2. They import nothing heavy, so a bad argument is
answered at once.
"""

from __future__ import annotations

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
