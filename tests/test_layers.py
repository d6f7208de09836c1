"""The shape of router/: no import cycle among its modules, and the failover engine apart from
the HTTP layer that calls it. Read from the sources with ast (nothing imported)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROUTER = Path(__file__).resolve().parent.parent / "router"

#: The HTTP layer: aiohttp handlers, their middleware, shared state and the app factory.
HTTP_LAYER = frozenset(
    {
        "router.app",
        "router.state",
        "router.middleware",
        "router.gateway",
        "router.relay",
        "router.probes",
        "router.admin",
        "router.ui",
        "router.serve",
    }
)
#: Below it: the failover engine and the pure pieces it is made of.
ENGINE = ("router.failover", "router.calls", "router.refusals", "router.settling")


def module_files() -> dict[str, Path]:
    modules = {}
    for path in ROUTER.rglob("*.py"):
        parts = path.relative_to(ROUTER.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of ``router`` that ``path`` imports, at any depth of the file (function
    bodies and ``if TYPE_CHECKING:`` blocks too: a late import still closes a circle)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # ``from package import submodule`` names the submodule
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found & modules.keys()


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_no_import_cycle_among_router_modules() -> None:
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None
    assert set(order) == set(graph)


def test_the_failover_engine_knows_nothing_of_the_http_layer() -> None:
    graph = import_graph()
    for name in ENGINE:
        reachable: set[str] = set()
        todo = [name]
        while todo:
            for dep in graph[todo.pop()] - reachable:
                reachable.add(dep)
                todo.append(dep)
        assert not reachable & HTTP_LAYER, name
        source = module_files()[name].read_text(encoding="utf-8")
        assert "from aiohttp import web" not in source, name
        assert "aiohttp.web" not in source, name


def test_late_and_type_checking_imports_count(tmp_path: Path) -> None:
    """A circle closed by an import inside a function or under TYPE_CHECKING (as router.admin
    once reached router.app) is a circle too."""
    source = tmp_path / "late.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from router.state import Live\n"
        "def late():\n"
        "    from router import app\n",
        encoding="utf-8",
    )
    assert imports_of(source, module_files()) == {"router.state", "router.app"}
