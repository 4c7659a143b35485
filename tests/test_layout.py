"""The layout docs/layout.md describes holds: imports point one way. No import circle anywhere in engine/ or
kernels/ (function-level imports included), runtime/ imports neither data/ nor models/, config.py imports no other
part of the engine, and kernels/ imports nothing of the engine's but the MiniALBERT model its benchmark trains."""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGES = {"engine": "biodistill.engine", "kernels": "biodistill.kernels"}


def modules() -> dict[str, ast.Module]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return out


def imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in its body)."""
    found = modules()
    edges = {name: set() for name in found}
    for name, (path, tree) in found.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            for candidate in [target, *(f"{target}.{a.name}" for a in node.names)]:
                if candidate in found and candidate != name:
                    edges[name].add(candidate)
    return edges


def test_no_import_circle():
    edges, state, stack = imports(), {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_imports_point_one_way():
    edges = imports()
    for module, targets in edges.items():
        if module.startswith("biodistill.engine.runtime."):
            assert not {t for t in targets if t.startswith(("biodistill.engine.data", "biodistill.engine.models"))}, (
                module
            )
        if module == "biodistill.engine.config":
            assert not {t for t in targets if t.startswith("biodistill.engine.")}, module
        if module.startswith("biodistill.kernels."):
            engine = {t for t in targets if t.startswith("biodistill.engine")}
            assert engine <= {"biodistill.engine.models.minialbert", "biodistill.engine.models"}, (module, engine)
