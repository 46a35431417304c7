"""The package's import graph: no cycles, no module importing a package above it, and a model
that names no back end. Read from the source with `ast`, so nothing is imported."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "nemotron_jax"
# package -> packages it must not import (directly or lazily, inside a function)
FORBIDDEN = {
    "kernels": ("models", "losses", "train", "eval", "data", "experiment"),
    "models": ("losses", "train", "eval", "data", "experiment"),
    "losses": ("train", "eval", "data", "experiment"),
    "eval": ("train", "experiment"),
    "data": ("models", "losses", "train", "eval", "experiment"),
    "convert": ("losses", "train", "eval", "experiment"),
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the nemotron_jax modules it imports (top-level or inside functions)."""
    paths = list(ROOT.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {}
    for path in paths:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("nemotron_jax"):
                    # `from pkg import mod` imports the module; `from mod import name` the module
                    submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
                    found |= submodules or {node.module}
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("nemotron_jax"))
        graph[_module_name(path)] = found
    return {m: (deps & modules) - {m} for m, deps in graph.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = _imports()


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_a_package_above_it(package):
    bad = sorted(
        f"{m} -> {d}"
        for m, deps in GRAPH.items()
        if _package(m) == package
        for d in deps
        if _package(d) in FORBIDDEN[package]
    )
    assert not bad, bad


def test_no_import_cycle_between_modules():
    """Cycles through a package's own `__init__` (which re-exports its modules) are not
    counted: a module importing `nemotron_jax.pkg.mod` runs `pkg/__init__` first anyway."""
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in GRAPH.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_models_name_no_back_end():
    words = ("onednn", "ffi", "kernels.cpu", "mallopt", "pallas_gpu", "cudnn")
    for path in (ROOT / "models").rglob("*.py"):
        text = path.read_text().lower()
        named = [w for w in words if w in text]
        assert not named, f"{path.name} names {named}"
