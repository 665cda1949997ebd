"""The package's shape (docs/architecture.md): floors that import only downwards, no import cycles,
modules readable in one sitting, a short top level.

The import graph is grimp's (the library under import-linter, which `.ci/run` also runs as
`lint-imports`): imports inside functions count, ``if TYPE_CHECKING:`` imports do not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grimp
import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(
        "metakd", "metakd_cli", include_external_packages=False, exclude_type_checking_imports=True
    )


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges) + 100))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    g = grimp.ImportGraph()
    for m in ("p.a", "p.b", "p.c"):
        g.add_module(m)
    g.add_import(importer="p.a", imported="p.b")
    g.add_import(importer="p.b", imported="p.a")
    g.add_import(importer="p.b", imported="p.c")
    assert _cycles(g) == [["p.a", "p.b"]]


def test_no_import_cycles(graph: grimp.ImportGraph) -> None:
    assert _cycles(graph) == []


def test_floors_import_only_downwards(graph: grimp.ImportGraph) -> None:
    """The layers of pyproject.toml's import-linter contract, checked with the same graph."""
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = contract["contracts"][0]["layers"]
    parsed = [grimp.Layer(*(m.strip() for m in layer.split("|"))) for layer in layers]
    illegal = graph.find_illegal_dependencies_for_layers(layers=parsed, containers=set())
    assert {(d.importer, d.imported) for d in illegal} == set()
    assert not any(m.startswith("metakd_cli") for m in graph.find_upstream_modules("metakd"))


def test_modules_are_readable_in_one_sitting() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in [*ROOT.joinpath("metakd").rglob("*.py"), *ROOT.joinpath("cli").rglob("*.py")]
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_top_level_is_the_floors_and_a_few_base_modules() -> None:
    top = sorted(p.name for p in ROOT.joinpath("metakd").glob("*.py"))
    floors = sorted(p.parent.name for p in ROOT.joinpath("metakd").glob("*/__init__.py"))
    assert floors == [  # config: the schema, the base every floor reads its section from
        "bench", "config", "data", "functional", "hypergrad", "reporting", "runs", "training",
    ]  # fmt: skip
    assert len(top) <= 10, top
