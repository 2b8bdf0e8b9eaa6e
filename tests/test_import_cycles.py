"""The package structure: no import cycle inside any package, lazy imports (inside functions) and
TYPE_CHECKING imports included; a cycle fails the test and is named."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["kvstore", "retrieval", "gpu_kernels", "cluster", "benchmarks"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of `known` that `path` imports anywhere in its text (top level, functions, TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from kvstore import config` imports the module kvstore.config; `from kvstore.x import y`, kvstore.x
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:  # a name inside a module, or a module outside the packages
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    files = {(_module_name(p)): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    known = set(files)
    graph = {}
    for name, path in files.items():
        top = name.split(".")[0]
        # edges inside the module's own package; a package's __init__ re-exporting its modules is not a cycle
        graph[name] = {m for m in _imports(path, name, known) if m.split(".")[0] == top and m != top}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_lazy_and_type_checking_imports(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kvstore.store import KVStore\n"
                   "def f():\n    from kvstore import config\n    import kvstore.hot.page_pool\n")
    assert _imports(mod, "kvstore.m", {"kvstore", "kvstore.store", "kvstore.config", "kvstore.hot.page_pool"}) == {
        "kvstore.store", "kvstore.config", "kvstore.hot.page_pool"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    graph = {k: v for k, v in _graph().items() if k.split(".")[0] == package}
    cycles = _cycles(graph)
    assert not cycles, f"import cycles in {package}: " + "; ".join(" <-> ".join(c) for c in cycles)
