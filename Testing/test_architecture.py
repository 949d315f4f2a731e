"""The library's rooms, checked from its source: no import circle, nothing from the development helpers,
no machine path in shipped code."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "AutoRegisterLib"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imported(module: str, path: Path, node, modules) -> list[str]:
    """Modules of the library an import statement loads: a submodule when it names one, else its package."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
            if node.level else node.module
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    out = []
    for name in names:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules:
            out.append(name)
    return out


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    """Module -> library modules it imports, at import time only or anywhere (inside functions too)."""
    modules = _modules()
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = tree.body if top_level_only else ast.walk(tree)
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(module, path, node, modules):
                    # A module's own packages are initialised before it runs: importing from them is no circle.
                    if target != module and not module.startswith(target + "."):
                        graph[module].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_back_a_module_that_imports_it():
    # At import time, and also counting the imports inside functions (a lazy import still ties two rooms).
    assert circles(import_graph(top_level_only=True)) == []
    assert circles(import_graph(top_level_only=False)) == []


def test_the_registration_engine_writes_no_outputs_and_leaves_the_scorer_to_scoring():
    graph = import_graph(top_level_only=False)
    reachable, todo = set(), ["AutoRegisterLib.pipeline"]
    while todo:
        for target in graph[todo.pop()] - reachable:
            reachable.add(target)
            todo.append(target)
    # auto_register returns a result; the command line and the demo write it (report, and with it matplotlib).
    assert "AutoRegisterLib.report" not in reachable
    assert not {m for m in graph["AutoRegisterLib.pipeline"] if m.startswith("AutoRegisterLib.similarity")}


def test_the_shipped_library_uses_no_development_helper_and_names_no_machine_path():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                assert not node.module.startswith("AutoRegisterDev"), path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("AutoRegisterDev") for a in node.names), path
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not node.value.startswith(("/usr/", "/home/", "/opt/", "/work/")), (path, node.value)
