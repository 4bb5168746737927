"""The project's own check that qlab's layers stay layered: imports parsed with ``ast``, nothing run.

The layers, bottom first (README, "Library map"): the core (formats, packing, tensor, affine,
codebooks, the quantize API, metrics); methods; nn (modules and dispatch); registry, config, driver,
footprint; then formats and apps. A lower layer never imports a higher one, and no module imports
itself in a circle. ``kernels/`` ships as ``qlab.kernels`` and sits on the core only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = {"formats", "format_types", "packing", "tensor", "affine", "codebooks", "scaled_floats", "quantize"}
CORE |= {"metrics"}
ABOVE_CORE = (
    "qlab.nn",
    "qlab.methods",
    "qlab.io",
    "qlab.registry",
    "qlab.config",
    "qlab.driver",
    "qlab.footprint",
    "qlab.models",
    "qlab.text",
    "qlab.gguf",
    "qlab.hf",
    "qlab.evaluate",
    "qlab.compare",
    "qlab.calibration",
    "qlab.plots",
    "qlab.widgets",
    "qlab.picker",
    "qlab.cli",
    "qlab.exercises",
)
MAX_LINES = 650


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted((ROOT / "qlab").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("qlab", *parts[1:]) if parts[0] == "kernels" else parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports_of(name: str) -> set[str]:
    """qlab modules ``name`` imports anywhere in its body (function-level imports included), except
    under ``if TYPE_CHECKING:``, which never runs."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    out = set()
    for m in found:
        # an import of a name inside a module counts as an import of that module
        while m and m not in MODULES:
            m = m.rpartition(".")[0]
        if m and m != name:
            out.add(m)
    return out


GRAPH = {name: imports_of(name) for name in MODULES}


def _edges() -> dict[str, set[str]]:
    """The graph without a package's imports of its own children (re-exports, not dependencies)."""
    return {
        n: {d for d in deps if not (MODULES[n].name == "__init__.py" and d.startswith(n + "."))}
        for n, deps in GRAPH.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v) :] + [v]
            if v not in state and (c := dfs(v)):
                return c
        stack.pop()
        state[u] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := dfs(n)):
            return c
    return None


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "qlab.tensor" in GRAPH["qlab.quantize"]  # `from qlab.tensor import ...` is seen


def test_no_import_cycle():
    cycle = find_cycle(_edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.split(".")[1:2] and n.split(".")[1] in CORE))
def test_core_imports_nothing_above_it(name):
    bad = sorted(d for d in GRAPH[name] if d.startswith(ABOVE_CORE))
    assert not bad, f"{name} (core) imports {bad}"


def test_nn_does_not_import_methods_or_anything_above():
    for name in MODULES:
        if name == "qlab.nn" or name.startswith("qlab.nn."):
            bad = sorted(d for d in GRAPH[name] if d.startswith(ABOVE_CORE) and not d.startswith("qlab.nn"))
            assert not bad, f"{name} imports {bad}"


def test_methods_build_no_layers():
    for name in MODULES:
        if name == "qlab.methods" or name.startswith("qlab.methods."):
            bad = sorted(
                d
                for d in GRAPH[name]
                if d.startswith(ABOVE_CORE) and not d.startswith(("qlab.methods", "qlab.calibration"))
            )
            assert not bad, f"{name} imports {bad}"


def test_kernels_sit_on_the_core_only():
    for name in MODULES:
        if name.startswith("qlab.kernels"):
            bad = sorted(d for d in GRAPH[name] if d.startswith(ABOVE_CORE))
            assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small_enough_to_read(name):
    lines = sum(1 for _ in MODULES[name].open())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines (> {MAX_LINES})"
