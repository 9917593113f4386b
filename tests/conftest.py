"""Session setup shared by the test modules.

Without CUDA, tests/test_triton_kernels.py runs the Triton kernels in Triton's interpreter. Triton
picks interpreter or compiler for its own library functions when ``triton`` is first imported, and
the engine's imports (through transformers) import it wherever it is installed, so
``TRITON_INTERPRET=1`` has to be set before any test module is imported. It is set only where it is
needed (no CUDA, not already set by the caller) and hidden again from every test of a module that
does not declare ``USES_TRITON_INTERPRETER``, so no other test runs under the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRETER_SET_HERE = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if INTERPRETER_SET_HERE:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def triton_interpreter_only_where_declared(request, monkeypatch):
    if INTERPRETER_SET_HERE and not getattr(request.module, "USES_TRITON_INTERPRETER", False):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
