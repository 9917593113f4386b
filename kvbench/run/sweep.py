"""Sweeps: sharding across processes and machines, and resuming a sweep that was stopped.

A sweep is a run with several methods and ratios: the runner already prefills each context once
and cuts every (method, ratio) cell from it. What this module adds is bookkeeping:

- **shards**: ``--shard i/n``, or ``RANK``/``WORLD_SIZE`` (torchrun, accelerate launch), or
  ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT`` give each process a deterministic share of
  the samples (every n-th); each process writes its own part file and the results folder is the
  union. There is no scheduler of our own.
- **resume**: rows are written atomically after every sample, so a killed sweep (SIGKILL included)
  has lost at most the sample in flight. Started again with the same command it skips every
  sample whose rows are all there, and never writes a row whose key is already in the folder.
  Part files that cannot be read are moved aside (``*.unreadable``) and their rows recomputed; rows
  written with an error are kept unless ``--retry-errors``.
- **lock**: a sweep holds ``<out>/.kvbench-lock-<i>of<n>`` (owner pid, host, start, command) while it
  runs, so a second sweep of the same shard into the same folder, or one whose shards overlap it,
  stops with one line instead of writing the same rows twice. A lock whose pid is dead on this host
  is stale and taken over. Shards of one sweep (same count, other index) share a folder freely.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from kvbench.errors import UsageError

LOCK_PREFIX = ".kvbench-lock-"


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` with 0 <= i < n."""
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes INDEX/COUNT such as 0/4, not {spec!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {spec}: the index must be in [0, {count})")
    return index, count


def shard_from_environment(env: dict[str, str] | None = None) -> tuple[int, int]:
    """This process's shard from torchrun/accelerate or a Slurm array, else (0, 1)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        names = ["RANK", "WORLD_SIZE"]
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        names = ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"]
    else:
        return 0, 1
    try:
        values = [int(env.get(name, "0")) for name in names]
    except ValueError:
        given = ", ".join(f"{name}={env[name]}" for name in names if name in env)
        raise ValueError(f"the launcher's shard ({given}) is not whole numbers; or pass --shard INDEX/COUNT") from None
    index, count = (values[0], values[1]) if len(values) == 2 else (values[0] - values[2], values[1])
    if not 0 <= index < count:
        raise ValueError(f"the launcher's shard {index}/{count} ({', '.join(names[:2])}) is not in [0, {count})")
    return index, count


def local_device(device: str | None, env: dict[str, str] | None = None) -> str | None:
    """Under torchrun each process on a machine takes its own GPU (``LOCAL_RANK``)."""
    env = os.environ if env is None else env
    if "LOCAL_RANK" in env and (device is None or device == "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(env['LOCAL_RANK']) % torch.cuda.device_count()}"
    return device


def resume_keys(out: Path, expected: set[tuple], retry_errors: bool, log=print) -> set[tuple]:
    """Keys already written in ``out`` and kept. Unreadable part files are set aside first (their rows
    are then missing and computed again); rows of this shard (``expected``) written with an error are
    dropped to be run again with ``retry_errors``, else kept and counted."""
    from kvbench.results import drop_rows, error_rows, set_aside_unreadable, written_keys

    set_aside_unreadable(out, log)
    errors = {key for key in error_rows(out) if key in expected}
    plural = "s" if len(errors) > 1 else ""
    if errors and retry_errors:
        drop_rows(out, errors)
        log(f"kvbench: running again {len(errors)} row{plural} written with an error")
    elif errors:
        log(f"kvbench: keeping {len(errors)} row{plural} written with an error (--retry-errors runs them again)")
    return written_keys(out)


def other_dtypes(written: set[tuple], model: str, task: str, dtype: str) -> list[str]:
    """Dtypes other than ``dtype`` of the rows already written for ``model`` on ``task``: a run in
    another dtype starts their samples afresh (dtype is part of a row's key), which is rarely meant
    when the CPU's default dtype differs between machines."""
    from kvbench.results import KEY_COLUMNS

    at = {column: KEY_COLUMNS.index(column) for column in ("model", "dtype", "task")}
    return sorted({key[at["dtype"]] for key in written
                   if key[at["model"]] == model and key[at["task"]] == task and key[at["dtype"]] != dtype})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path: Path) -> dict | None:
    """A lock's owner, or None when the file vanished; an unreadable lock counts as held by nobody known."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _stale(owner: dict) -> bool:
    """Dead owner on this host (a lock from another host cannot be checked, so it is never stale)."""
    return owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) and not _alive(owner["pid"])


class FolderLock:
    """This process's claim on its shard of a results folder (see the module docstring)."""

    def __init__(self, out: Path, shard: tuple[int, int], command: str = "", log=print):
        self.out, self.shard, self.command, self.log = Path(out), shard, command, log
        index, count = shard
        self.path = self.out / f"{LOCK_PREFIX}{index}of{count}"
        self.created_out = False
        self.others = 0  # live locks of other shards of the same sweep

    def __enter__(self) -> FolderLock:
        if not self.out.exists():
            self.out.mkdir(parents=True)
            self.created_out = True
        index, count = self.shard
        for other in sorted(self.out.glob(LOCK_PREFIX + "*")):
            owner = _read_lock(other)
            if owner is None:
                continue
            if owner and _stale(owner):
                self.log(f"kvbench: removing the stale lock {other.name} of pid {owner['pid']} (no longer running)")
                other.unlink(missing_ok=True)
                continue
            other_count = other.name[len(LOCK_PREFIX):].partition("of")[2]
            if other != self.path and other_count == str(count):
                self.others += 1
                continue
            self._release_folder()
            who = (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}" if owner
                   else "an unknown process")
            raise UsageError(f"{self.out} is being written by another sweep ({who}; its lock {other.name}): "
                             f"wait for it, use another --out, or delete {other} if that sweep is gone")
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": self.command}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another process took it between our look and now
            self._release_folder()
            raise UsageError(f"{self.out} is being written by another sweep (its lock {self.path.name} "
                             "appeared just now): wait for it or use another --out") from None
        with os.fdopen(fd, "w") as handle:
            json.dump(owner, handle)
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
        self._release_folder()

    def _release_folder(self) -> None:
        """A folder this lock made and nothing else filled goes again: bad input leaves nothing behind."""
        if self.created_out:
            try:
                self.out.rmdir()
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise
