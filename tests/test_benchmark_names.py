"""`python benchmarks/NAME.py` puts benchmarks/ first on sys.path, so a script named like an installed
module hides it from everything the script imports: benchmarks/kernels.py once hid Hugging Face's
``kernels`` package, which transformers 5.25 imports, and every benchmark failed at its first import."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_no_benchmark_script_shadows_an_importable_module():
    others = [p for p in sys.path if Path(p or ".").resolve() != BENCHMARKS]
    saved = sys.path[:]
    try:
        sys.path[:] = others
        shadowed = [script.name for script in sorted(BENCHMARKS.glob("*.py"))
                    if script.stem in sys.stdlib_module_names or importlib.util.find_spec(script.stem) is not None]
    finally:
        sys.path[:] = saved
    assert sorted(BENCHMARKS.glob("*.py")), "no benchmark scripts found"
    assert not shadowed, f"benchmark scripts named like importable modules: {shadowed}"
