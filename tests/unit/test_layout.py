"""The layout stays readable (issue 15): no import cycles between modules, lower layers never import
higher ones, and the sans-IO parts import no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("proxy", "rules", "masking")
#: modules that must stay free of sockets, tasks and processes (tested with byte strings and values)
SANS_IO = ("proxy.wire", "proxy.session", "rules", "masking")
IO_MODULES = ("asyncio", "socket", "ssl", "asyncpg", "subprocess", "multiprocessing", "selectors", "threading")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in the file, type-checking-only ones left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[str, bool]] = []
    type_checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            type_checking.update(id(n) for n in ast.walk(node))
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else \
                    module.split(".")[: len(module.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if node.module or not node.level:  # `from . import x` imports the submodule x, not the package
                out.append((name, id(node) in top))
            out += [(f"{name}.{a.name}", id(node) in top) for a in node.names]
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for m, p in files.items():
        for name, _ in _imports(p, m):
            if name in files and name != m:
                graph[m].add(name)
    return graph


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_engine_never_imports_the_proxy() -> None:
    bad = [(m, n) for m, ns in _graph().items() if m.startswith(("rules", "masking")) for n in ns
           if n.startswith("proxy")]
    assert not bad, bad


def test_sans_io_modules_import_no_io() -> None:
    bad = []
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            m = _module(p)
            if not m.startswith(SANS_IO):
                continue
            for name, _ in _imports(p, m):
                if name.split(".")[0] in IO_MODULES:
                    bad.append((m, name))
    assert not bad, bad
