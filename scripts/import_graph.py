"""Print the import graph of ``llm_service`` and its longest chain of imports.

Usage: ``python scripts/import_graph.py [--functions] [--dot]``

Reads the sources (nothing is imported). By default only imports that run when
a module is imported count (module level, ``if TYPE_CHECKING:`` blocks left
out); ``--functions`` also counts imports written inside functions. Each edge
goes to the module named: ``from .lmstudio import X`` is an edge to the
``lmstudio`` package (its ``__init__``), ``from .lmstudio.chunks import X`` to
``lmstudio.chunks``. The report ends with the rules of the one door
(ARCHITECTURE.md) checked on that graph; it exits 1 when one is broken.
"""

from __future__ import annotations

import argparse
import ast
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llm_service"
#: The door to the model servers: the only importer of the client.
DOOR = f"{PACKAGE}.upstreams"
#: The client, and the package that re-exports it.
CLIENT = f"{PACKAGE}.lmstudio.client"
CLIENT_PACKAGE = f"{PACKAGE}.lmstudio"
ERROR_MAPPER = f"{PACKAGE}.errors"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, functions: bool) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if (
                isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                and not functions
            ):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def graph(functions: bool) -> dict[str, set[str]]:
    """``{module: {modules of the package it imports}}``."""
    paths = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(path): path for path in paths}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        base = name.split(".") if is_package else name.split(".")[:-1]
        for node in _imports(ast.parse(path.read_text()), functions):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    anchor = base[: len(base) - node.level + 1]
                    stem = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                # `from . import x` and `from .pkg import submodule` name modules.
                targets = [
                    f"{stem}.{alias.name}"
                    if f"{stem}.{alias.name}" in modules
                    else stem
                    for alias in node.names
                ]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def longest_chain(edges: dict[str, set[str]]) -> list[str]:
    """The longest chain of imports without repeating a module."""

    @functools.cache
    def longest_from(node: str, seen: frozenset[str]) -> tuple[str, ...]:
        best: tuple[str, ...] = ()
        for target in sorted(edges[node] - seen):
            chain = longest_from(target, seen | {target})
            if len(chain) > len(best):
                best = chain
        return (node, *best)

    return list(
        max(
            (longest_from(node, frozenset({node})) for node in sorted(edges)),
            key=len,
        )
    )


def blueprints() -> set[str]:
    """Modules that define a blueprint with routes (the views)."""
    found = set()
    for path in (ROOT / PACKAGE).rglob("*.py"):
        text = path.read_text()
        if "Blueprint(" in text and "@bp." in text:
            found.add(module_name(path))
    return found


def problems(edges: dict[str, set[str]]) -> list[str]:
    found = []
    views = blueprints() - {f"{PACKAGE}.openapi"}  # the API's own description
    for view in sorted(views):
        for target in sorted(edges[view] & views):
            found.append(f"blueprint {view} imports blueprint {target}")
    for name in sorted(edges):
        inside = name.startswith((DOOR, CLIENT_PACKAGE))
        for target in sorted(edges[name] & {CLIENT, CLIENT_PACKAGE}):
            if not inside:
                found.append(f"{name} imports {target} (only {DOOR} may)")
        if name.startswith(f"{PACKAGE}.lmstudio") and any(
            not target.startswith(f"{PACKAGE}.lmstudio") for target in edges[name]
        ):
            found.append(f"{name} imports from outside lmstudio/")
    for target in sorted(edges[ERROR_MAPPER]):
        if target.startswith(DOOR) or target in (CLIENT, CLIENT_PACKAGE):
            found.append(f"{ERROR_MAPPER} imports {target}, which holds state")
    if any(name.startswith(f"{PACKAGE}.local_backend") for name in edges):
        found.append(f"{PACKAGE}.local_backend: a dev tool inside the service")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--functions",
        action="store_true",
        help="also count imports written inside functions",
    )
    parser.add_argument("--dot", action="store_true", help="print Graphviz dot only")
    args = parser.parse_args(argv)
    edges = graph(args.functions)
    short = {name: name.removeprefix(f"{PACKAGE}.") for name in edges}
    if args.dot:
        print("digraph llm_service {")
        for name in sorted(edges):
            for target in sorted(edges[name]):
                print(f'  "{short[name]}" -> "{short[target]}";')
        print("}")
        return 0
    counted = "incl. imports inside functions" if args.functions else "module level"
    print(f"imports between modules of {PACKAGE}/ ({counted}):")
    for name in sorted(edges):
        targets = ", ".join(short[t] for t in sorted(edges[name])) or "-"
        print(f"  {short[name]:<22} -> {targets}")
    views = sorted(short[v] for v in blueprints() - {f"{PACKAGE}.openapi"})
    print(f"blueprints (side by side): {', '.join(views)}")
    importers = sorted(short[n] for n in edges if edges[n] & {CLIENT, CLIENT_PACKAGE})
    print(f"importers of lmstudio.client or lmstudio: {', '.join(importers) or '-'}")
    mapped = ", ".join(short[t] for t in sorted(edges[ERROR_MAPPER]))
    print(f"the error mapper imports: {mapped}")
    chain = longest_chain(edges)
    print(f"longest chain: {len(chain)} modules ({len(chain) - 1} imports)")
    print("  " + " -> ".join(short[name] for name in chain))
    found = problems(edges)
    for line in found:
        print(f"PROBLEM {line}")
    print(f"{len(found)} problem(s)" if found else "one door: ok")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
