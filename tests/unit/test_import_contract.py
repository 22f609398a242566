"""The import contract (docs/ARCHITECTURE.md): imports point down.

- ``common`` imports nothing of ``services``;
- a service imports ``common`` and itself, never another service;
- no import cycles among the project's modules, counting imports inside
  functions too (a deferred import only hides a cycle).

Checked on the source (AST), so it needs no import of the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "services")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports (anywhere in the file but under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node):
            skip |= {id(n) for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in known:  # "from x import name": the module is x
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def service_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "services" and len(parts) > 1 else None


def test_common_imports_no_service() -> None:
    bad = {(a, b) for a, deps in graph().items() if a.startswith("common") for b in deps if b.startswith("services")}
    assert not bad, f"common must not import services: {sorted(bad)}"


def test_services_import_only_common_and_themselves() -> None:
    bad = set()
    for a, deps in graph().items():
        own = service_of(a)
        for b in deps:
            other = service_of(b)
            if own is not None and other is not None and other != own:
                bad.add((a, b))
    assert not bad, f"a service imports another service (move the shared part to common/): {sorted(bad)}"


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    g = graph()
    # a package's __init__ re-exporting its modules is not a cycle of the modules themselves
    g = {a: {b for b in deps if not a.startswith(b + ".")} for a, deps in g.items()}
    found = cycles(g)
    assert not found, f"import cycles: {found}"


def test_the_checker_sees_a_cycle_and_a_sideways_import() -> None:
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    g = graph()
    assert "common.wire.rules" in g["common.wire.packet"]  # relative imports resolve
    assert "common.bus" in g["services.router.service"]
