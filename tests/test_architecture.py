"""The layering of ARCHITECTURE.md: protocol modules do no I/O; no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dnsproxy"

# Sans-IO: they take `now` and bytes, and never touch a socket, the loop or the clock.
NO_IO = ("wire", "cache", "framing", "pipeline", "resolution", "config", "reload")
IO_MODULES = {"asyncio", "socket", "selectors", "time", "threading", "subprocess", "uvloop"}


def imports(module: str) -> set[str]:
    """The modules ``module`` imports, type-checking-only imports included."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            prefix = "dnsproxy." if node.level else ""
            found.add(prefix + node.module)
    return found


def local(module: str) -> set[str]:
    """The dnsproxy modules ``module`` imports."""
    names = {n.split(".", 1)[1] for n in imports(module) if n.startswith("dnsproxy.")}
    return {n.split(".")[0] for n in names}


def test_protocol_modules_do_no_io() -> None:
    for module in NO_IO:
        used = {name.split(".")[0] for name in imports(module)} & IO_MODULES
        assert not used, f"{module}.py imports {sorted(used)}"


def test_no_import_cycles() -> None:
    modules = [p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    graph = {m: local(m) & set(modules) for m in modules}

    def visit(module: str, path: list[str]) -> None:
        for dep in graph[module]:
            assert dep not in path, " -> ".join([*path[path.index(dep) :], dep])
            visit(dep, [*path, dep])

    for module in modules:
        visit(module, [module])
