"""The layering rule of docs/architecture.md, enforced on the import graph, and no issue numbers in
code or docs.

    onerec/ (library)  <-  ops/ (operating tooling)  <-  tasks/ (pipeline)  <-  onerec_fp8/ (CLI), dags/

A package imports only packages below it, and no modules of a package import each other in a loop:
every import statement (module top or inside a function) of every .py file is read with ast, so a
lazy import cannot hide an upward edge or a loop.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# package -> the top-level packages of this repo it must never import
FORBIDDEN = {
    "onerec": {"ops", "tasks", "onerec_fp8", "dags"},
    "ops": {"tasks", "onerec_fp8", "dags"},
    "tasks": {"onerec_fp8", "dags"},
}
CODE_DIRS = ("onerec", "ops", "tasks", "onerec_fp8", "dags", "bench", "tests")
DOC_DIRS = ("docs", "bench", "mlflow_config", "helm", "containers")
# Import loops allowed, each exactly as it is (a loop that grows or a new one fails): none.
ALLOWED_LOOPS: tuple[frozenset[str], ...] = ()


def imported_modules(path: Path, modules: frozenset[str] = frozenset()) -> list[tuple[int, str]]:
    """(line, module) of every import in `path`; `from a import b` names a.b when a.b is in `modules`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            found += [(node.lineno, m) for m in submodules or [node.module]]
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_loops(package: str) -> list[frozenset[str]]:
    """The modules of `package` that import each other in a loop (strongly connected components
    of its import graph with more than one module)."""
    paths = {module_name(p): p for p in sorted((REPO / package).rglob("*.py"))}
    names = frozenset(paths)
    graph = {m: {i for _, i in imported_modules(p, names) if i in names and i != m} for m, p in paths.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = {stack.pop()}
            while v not in component:
                component.add(stack.pop())
            if len(component) > 1:
                loops.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return loops


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_imports_only_the_layers_below_it(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    upward = [
        f"{path.relative_to(REPO)}:{line}: import {module}"
        for path in files
        for line, module in imported_modules(path)
        if module.split(".")[0] in FORBIDDEN[package]
    ]
    assert not upward, f"{package}/ imports a layer above it:\n" + "\n".join(upward)


@pytest.mark.parametrize("package", ("onerec", "ops", "tasks", "onerec_fp8", "dags"))
def test_no_modules_of_a_package_import_each_other_in_a_loop(package):
    loops = [loop for loop in import_loops(package) if loop not in ALLOWED_LOOPS]
    assert not loops, f"import loops in {package}/:\n" + "\n".join(" <-> ".join(sorted(loop)) for loop in loops)


def test_the_loop_finder_finds_a_loop_through_a_lazy_import(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from pkg.c import g\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from pkg import a\n")
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    assert import_loops("pkg") == [frozenset({"pkg.a", "pkg.b", "pkg.c"})]


def test_the_walk_sees_lazy_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from tasks.registry import client\n    import ops.stack\n")
    assert [m for _, m in imported_modules(sample)] == ["tasks.registry", "ops.stack"]


# the story of the work instead of what is: rounds, who did it, what comes next
STORY = re.compile(r"\bround \d+\b|\b(first|second|third) engineer\b|\bnext gpu\b|\bsession \d+\b", re.IGNORECASE)


def test_docs_say_what_is_not_how_it_came_to_be():
    docs = [REPO / "README.md", *(p for folder in DOC_DIRS for p in sorted((REPO / folder).rglob("*.md")))]
    hits = [f"{path.relative_to(REPO)}:{number}: {text.strip()}"
            for path in docs for number, text in enumerate(path.read_text().splitlines(), 1) if STORY.search(text)]
    assert not hits, "docs tell how the work went (say what is, with numbers and dates):\n" + "\n".join(hits)


def test_no_issue_numbers_in_code():
    hits = []
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == Path(__file__):
                continue
            for number, text in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\bissues?\s*#?\d+", text, re.IGNORECASE):
                    hits.append(f"{path.relative_to(REPO)}:{number}: {text.strip()}")
    docs = [REPO / "README.md", *(p for folder in DOC_DIRS for p in sorted((REPO / folder).rglob("*.md")))]
    for path in [REPO / "Makefile", REPO / "pyproject.toml", *docs]:
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bissues?\s*#?\d+", text, re.IGNORECASE):
                hits.append(f"{path.relative_to(REPO)}:{number}: {text.strip()}")
    assert not hits, "issue numbers in code or docs (say what the code does instead):\n" + "\n".join(hits)
