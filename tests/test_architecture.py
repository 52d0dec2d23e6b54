"""The package's structure: no import cycles between its modules, and an architecture page that names every module.

The imports are read from the source (``ast``), every ``import`` and ``from ... import`` in a module wherever it
stands: at the top, inside a function (a lazy import) or under ``if TYPE_CHECKING:`` (a type-only import), since
each is a dependency a reader has to follow. ``from a.b import c`` depends on ``a.b`` (its ``__init__`` runs) and,
when ``c`` is a module, on ``a.b.c``.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]
PACKAGE = REPO / "meancache"
DESIGN_PAGE = REPO / "docs" / "design.md"


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every Python module under ``meancache/`` (the kernels through their link)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((PACKAGE / "kernels").glob("*.py")):  # a link to kernels/, which rglob does not enter
        modules[f"meancache.kernels.{path.stem}"] = path
    return modules


def imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that the module ``name`` (its source at ``path``) imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(path, name, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted; a module importing itself
    is left out (``imported_modules`` drops it)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_lazy_and_type_only_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.typed import T\n"
        "def f():\n    from p import lazy\n    import p.plain\n"
    )
    modules = {"p", "p.typed", "p.lazy", "p.plain", "p.unused"}
    assert imported_modules(source, "p.mod", modules) == {"p", "p.typed", "p.lazy", "p.plain"}


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and graph["meancache.integrations.diffusers.gate"]  # the walk saw the package
    assert cycles(graph) == [], "modules that import each other (directly or around a loop)"


def test_the_architecture_page_names_every_module():
    """docs/design.md gives every module under ``meancache/`` a line: its path (``meancache/...py``, the kernels as
    ``kernels/...py``) in backticks."""
    text = DESIGN_PAGE.read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:meancache|kernels)/[\w/]+\.py)`", text))
    paths = {str(path.relative_to(REPO)).removeprefix("meancache/") if ".kernels." in name
             else str(path.relative_to(REPO)) for name, path in module_files().items()}  # fmt: skip
    assert sorted(paths - named) == [], "modules docs/design.md does not name"
    assert sorted(named - paths) == [], "paths docs/design.md names that are no module"


def test_no_package_exports_a_name_of_its_own_submodule():
    """``package.name`` must mean one thing: a package that exports a function under the name of one of its
    submodules, from another module (``summary`` from ``pipeline`` beside a ``summary`` module), holds the function
    or the module depending on which was imported last. An op module exporting its own op (``ops.jvp_attention``'s
    ``jvp_attention``) always ends as the function, which is what the name is documented as."""
    clashes = []
    files = module_files()
    for name, path in files.items():
        if path.name != "__init__.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom) and node.module != name:
                clashes += [f"{name}.{alias.asname or alias.name} (from {node.module})" for alias in node.names
                            if f"{name}.{alias.asname or alias.name}" in files
                            and node.module != f"{name}.{alias.asname or alias.name}"]  # fmt: skip
    assert clashes == []


DIFFUSERS_LAYERS = (
    ("layout", "components", "generation_summary", "distributed", "ranks"),
    ("guidance", "exact_jvp"),
    ("key",),
    ("first_use",),
    ("run",),
    ("gate",),
    ("scheduler_hooks",),
    ("pipeline", "calibration"),
    ("selection",),
)
"""The rows of docs/design.md's diagram of ``integrations/diffusers/``, bottom first."""


def test_the_diffusers_integration_imports_only_downwards():
    """Each module of ``integrations/diffusers/`` imports only modules of the rows below its own in the
    architecture page's diagram (:data:`DIFFUSERS_LAYERS`), and every module of the package has a row."""
    prefix = "meancache.integrations.diffusers"
    row = {f"{prefix}.{name}": level for level, names in enumerate(DIFFUSERS_LAYERS) for name in names}
    graph = import_graph()
    package = {name for name in graph if name.startswith(f"{prefix}.")}
    assert package == set(row), "modules of integrations/diffusers/ missing from (or extra in) the diagram's rows"
    upward = [(m, i) for m in sorted(package) for i in sorted(graph[m]) if i in row and row[i] >= row[m]]
    assert upward == []


def test_the_kernels_and_the_schedule_api_import_without_diffusers(tmp_path):
    """``import meancache.ops`` and ``from meancache import Schedule`` do not import diffusers (seconds, and
    third-party import notices); the names that need it load it when first used (``meancache.__getattr__``)."""
    code = (
        "import sys\n"
        "import meancache.ops\n"
        "from meancache import MeanCacheConfig, Schedule, sample, solve_pssp\n"
        "assert 'diffusers' not in sys.modules, sorted(m for m in sys.modules if m.startswith('diffusers'))[:5]\n"
        "from meancache import enable_mean_cache\n"
        "assert 'diffusers' in sys.modules and enable_mean_cache.__module__.startswith('meancache.integrations')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)  # outside the repository, as a user
