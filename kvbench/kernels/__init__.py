"""Kernels for kvbench's hot loops: decode attention over per-head KV segments, and compaction of a
padded layer into the packed per-head layout.

Two layouts, per decoder layer (batch ``B``, KV heads ``H``, head dim ``D``, GQA group ``G``):

- **packed**: ``keys, values (N, D)``; segment ``s = b * H + h`` holds rows
  ``[start[s], start[s] + capacity[s])``, of which the first ``length[s]`` are real entries in cache
  order and the rest slack that is never read. ``start, length, capacity`` are ``(B*H,)`` integer
  tensors (int32 or int64; :func:`compact` returns int64). A length of 0 is a head that kept nothing.
- **padded**: ``keys, values (B, H, L, D)`` with ``valid (B, H, L)`` (None: all valid).

Every operation has two backends, the same results up to float rounding:

- ``"torch"``: plain PyTorch (:mod:`kvbench.kernels.reference`), one segment at a time; runs anywhere.
- ``"triton"``: Triton kernels (:mod:`kvbench.kernels.triton_kernels`) on CUDA tensors, or on CPU
  tensors under Triton's interpreter (the tests' mode: correct, slow), which needs
  ``TRITON_INTERPRET=1`` both when the kernels are first imported and while they run.
- ``"auto"``: ``"triton"`` on CUDA tensors where Triton is installed, else ``"torch"``, silently
  (never the interpreter, which is for tests).

Asking for ``"triton"`` where it cannot run (Triton not installed, or CPU tensors without the
interpreter) falls back to ``"torch"`` with a warning, once per reason: a benchmark asked to use the
fast kernels should still finish on a machine without them, and the warning (plus the backend a
caller records from :func:`resolve_backend`) says which path ran.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType

import torch

from kvbench.kernels import reference

BACKENDS = ("auto", "triton", "torch")
_warned: set[str] = set()


def _triton_module() -> ModuleType:
    return importlib.import_module("kvbench.kernels.triton_kernels")


def triton_unavailable(device: torch.device | str) -> str | None:
    """Why the Triton kernels cannot run on tensors of ``device``, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if torch.device(device).type == "cuda":
        return _triton_module().interpreter_problem()
    if os.environ.get("TRITON_INTERPRET", "").lower() not in ("1", "true", "on", "yes"):  # as Triton reads it
        return "the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 to interpret them"
    module = _triton_module()
    if not module.INTERPRETED:
        return "the Triton kernels were compiled for CUDA: TRITON_INTERPRET=1 was set after they were imported"
    return module.interpreter_problem()


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend that runs for ``name`` (one of :data:`BACKENDS`) on tensors of ``device``:
    ``"triton"`` or ``"torch"``. An explicit ``"triton"`` that cannot run warns once per reason."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "torch" or (name == "auto" and torch.device(device).type != "cuda"):
        return "torch"
    reason = triton_unavailable(device)
    if reason is None:
        return "triton"
    if name == "triton" and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"kernels: using the PyTorch path because {reason}", RuntimeWarning, stacklevel=3)
    return "torch"


def decode_attention_packed(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    group: int,
    scale: float,
    backend: str = "auto",
    max_length: int | None = None,
) -> torch.Tensor:
    """Attention of one new query token per batch row over the packed layout.

    ``q (B, Hq, D)`` with ``Hq = H * group``; query head ``hq`` of row ``b`` attends over segment
    ``b * H + hq // group`` with softmax scale ``scale``. Returns ``(B, Hq, D)`` in ``q``'s dtype;
    a head of length 0 gives zeros. ``max_length`` (Triton only) is a host-side bound on ``length``
    that spares reading ``length.max()`` back from the device.
    """
    if resolve_backend(backend, q.device) == "triton":
        return _triton_module().decode_attention_packed(
            q, keys, values, start, length, group, scale, max_length=max_length
        )
    return reference.decode_attention_packed(q, keys, values, start, length, group, scale)


def decode_attention_padded(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of one new query token per batch row over the padded layout: ``q (B, Hq, D)`` over
    ``keys/values (B, H, L, D)``, entries with ``valid`` False hidden. Returns ``(B, Hq, D)``; a head
    with no valid entry gives zeros."""
    if resolve_backend(backend, q.device) == "triton":
        return _triton_module().decode_attention_padded(q, keys, values, valid, scale)
    return reference.decode_attention_padded(q, keys, values, valid, scale)


def compact(
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    slack: int,
    valid: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the entries ``keep & valid`` of a padded layer ``(B, H, L, D)`` head by head, in cache
    order, leaving ``slack`` spare rows after each segment.

    Returns ``(packed_keys, packed_values, start, length, capacity)``: ``(N, D)`` tensors with
    ``N = sum(capacity)``, and int64 ``(B*H,)`` tensors. Slack rows are uninitialised.
    """
    if resolve_backend(backend, keys.device) == "triton":
        return _triton_module().compact(keys, values, keep, slack, valid)
    return reference.compact(keys, values, keep, slack, valid)
