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
"""

from __future__ import annotations

import os


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
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def local_device(device: str | None, env: dict[str, str] | None = None) -> str | None:
    """Under torchrun each process on a machine takes its own GPU (``LOCAL_RANK``)."""
    env = os.environ if env is None else env
    if "LOCAL_RANK" in env and (device is None or device == "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(env['LOCAL_RANK']) % torch.cuda.device_count()}"
    return device
