"""The layout is the architecture: imports point downward, registries refuse duplicates and find
plugins, method specs build methods, and an installed (not editable) package works on its own."""

from __future__ import annotations

import ast
import os
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest

from kvbench import plugins
from kvbench.core.method import METHODS, Method, register_method
from kvbench.core.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
# where each installed package lives in the repository
PACKAGE_DIRS = {"kvbench": ROOT / "kvbench", "kvbench.methods": ROOT / "methods", "kvbench.tasks": ROOT / "tasks",
                "kvbench.leaderboard_app": ROOT / "leaderboard_app"}


def modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "kvbench" and parts[0] in ("methods", "tasks", "leaderboard_app"):
                continue
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The kvbench modules ``path`` imports (at any depth of the file: lazy imports count too)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known}
    return out - {name}


GRAPH = {name: imports_of(name, path, set(modules())) for name, path in modules().items()}


def test_the_engine_core_imports_no_method_and_no_task():
    core = {n: deps for n, deps in GRAPH.items() if n.startswith("kvbench.core")}
    assert len(core) >= 10
    for name, deps in core.items():
        wrong = {d for d in deps if not d.startswith(("kvbench.core", "kvbench.kernels", "kvbench.errors",
                                                       "kvbench.downloads"))}
        assert not wrong, f"{name} imports {wrong}: the core imports only itself, kernels, errors and downloads"


def test_methods_and_tasks_import_only_the_engine_contract():
    allowed = ("kvbench.core", "kvbench.errors", "kvbench.downloads")
    for name, deps in GRAPH.items():
        if name.startswith(("kvbench.methods.", "kvbench.tasks.")):
            family = ".".join(name.split(".")[:2])
            wrong = {d for d in deps if not (d.startswith(allowed) or d.startswith(family))}
            assert not wrong, f"{name} imports {wrong}"


def test_there_is_no_import_cycle():
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in GRAPH.get(node, ()):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " → ".join(trail[trail.index(dep):] + [dep]) if dep in trail
                            else f"import cycle through {dep}")
            if dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_pipeline_is_assembled_in_one_module():
    """Only the session strings prefill, scoring and eviction together (the primitives are the engine's)."""
    assemblers = []
    for name, path in modules().items():
        text = path.read_text()
        if all(step in text for step in ("engine.prefill(", "score_layers(", "engine.evict(")):
            assemblers.append(name)
    assert assemblers == ["kvbench.core.session"]


def test_a_second_method_of_the_same_name_is_an_error():
    registry: Registry = Registry("method")

    class First(Method):
        name = "twin"

    class Second(Method):
        name = "twin"

    registry.register(First)
    registry.register(First)  # the same class again (a module reloaded) is fine
    plugins.list_methods()  # the built-in snapkv is registered
    with pytest.raises(ValueError, match="two methods are called 'twin'"):
        registry.register(Second)
    with pytest.raises(ValueError, match="two methods are called 'snapkv'"):
        register_method(type("SnapKV", (Method,), {"name": "snapkv"}))
    assert METHODS["snapkv"].__module__ == "kvbench.methods.snapkv"


def test_methods_and_tasks_from_another_package_are_found_through_entry_points(tmp_path, monkeypatch):
    """A throw-away distribution on sys.path that declares entry points in both groups."""
    (tmp_path / "kvb_plugin").mkdir()
    (tmp_path / "kvb_plugin" / "__init__.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        import torch
        from kvbench.core.method import Method
        from kvbench.core.task import Task

        @dataclass
        class KeyNorm(Method):
            """Keep the keys with the smallest L2 norm."""
            name = "plugin_keynorm"
            def score(self, view):
                return -view.keys.float().norm(dim=-1)

        class Echo(Task):
            name = "plugin_echo"
            def subtasks(self):
                return ["one"]
            def samples(self, subtasks, n_samples, tokenizer, length, seed):
                return iter(())
    '''))
    info = tmp_path / "kvb_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvb-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kvbench.methods]\nkeynorm = kvb_plugin:KeyNorm\n\n"
                                           "[kvbench.tasks]\necho = kvb_plugin:Echo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_loaded", set())
    try:
        assert "plugin_keynorm" in plugins.list_methods()
        assert "plugin_echo" in plugins.list_tasks()
        method = plugins.make_method("plugin_keynorm:sinks=2")
        assert method.sinks == 2 and method.spec() == "plugin_keynorm:sinks=2"
    finally:
        for registry, name in ((METHODS, "plugin_keynorm"), (plugins.TASKS, "plugin_echo")):
            registry._classes.pop(name, None)


def test_method_specs_set_typed_fields_and_name_the_valid_ones():
    method = plugins.make_method("snapkv:window_size=32,kernel_size=7,pooling=max", seed=3)
    assert (method.window_size, method.kernel_size, method.pooling, method.seed) == (32, 7, "max", 3)
    assert method.spec() == "snapkv:seed=3,window_size=32,kernel_size=7,pooling=max"
    assert plugins.make_method(method.spec()).config() == method.config()  # the spec rebuilds the method
    assert plugins.make_method("finch:window_size=16").window_size == 16
    assert plugins.make_method("finch:window_size=none").window_size is None  # an optional field takes none
    with pytest.raises(plugins.SpecError, match="has no field 'window'.*its fields: allocation, kernel_size"):
        plugins.make_method("snapkv:window=3")
    with pytest.raises(plugins.SpecError, match="window_size='big' is not int"):
        plugins.make_method("snapkv:window_size=big")
    with pytest.raises(plugins.SpecError, match="is not FIELD=VALUE"):
        plugins.make_method("snapkv:32")
    with pytest.raises(plugins.SpecError, match="unknown method 'snap'"):
        plugins.make_method("snap")


def test_sweep_methods_split_into_specs():
    from kvbench.cli.parser import split_methods

    assert split_methods("snapkv:window_size=32,kernel_size=7,gated,kvzap:kind=linear") == [
        "snapkv:window_size=32,kernel_size=7", "gated", "kvzap:kind=linear"]


def test_an_installed_package_works_from_another_directory(tmp_path):
    """``pip install .`` (not editable) into a fresh venv: the methods, the tasks and the leaderboard
    app come from site-packages, not from the clone."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)  # torch & co. from this environment
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)], check=True,
                   capture_output=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": ""}
    kvbench = env_dir / "bin" / "kvbench"

    def run(*args: str) -> str:
        done = subprocess.run([str(kvbench), *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listed = run("list", "methods")
    assert all(name in listed for name in ("snapkv", "gated", "kvzap", "kvdirect"))
    assert "ruler:niah_single_1" in run("list", "tasks")
    assert "--results" in run("leaderboard", "--help")
    command = run("leaderboard", "--print-command")
    app = Path(command.split(" run ")[1].split()[0])
    assert app.is_file() and app.name == "app.py" and str(env_dir) in str(app)
    where = subprocess.run([str(python), "-c", "import kvbench.methods.gated as g; print(g.SHIPPED)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert str(env_dir) in where and (Path(where) / "smollm2-135m" / "gated.safetensors").is_file()
