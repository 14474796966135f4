"""The layering rule of docs/architecture.md, enforced on the import graph, and no issue numbers in code.

    onerec/ (library)  <-  ops/ (operating tooling)  <-  tasks/ (pipeline)  <-  onerec_fp8/ (CLI), dags/

A package imports only packages below it: every import statement (module top or inside a function)
of every .py file is read with ast, so a lazy import cannot hide an upward edge.
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


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


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


def test_the_walk_sees_lazy_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from tasks.registry import client\n    import ops.stack\n")
    assert [m for _, m in imported_modules(sample)] == ["tasks.registry", "ops.stack"]


def test_no_issue_numbers_in_code():
    hits = []
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == Path(__file__):
                continue
            for number, text in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\bissues?\s*#?\d+", text, re.IGNORECASE):
                    hits.append(f"{path.relative_to(REPO)}:{number}: {text.strip()}")
    for name in ("Makefile", "pyproject.toml"):
        for number, text in enumerate((REPO / name).read_text().splitlines(), 1):
            if re.search(r"\bissues?\s*#?\d+", text, re.IGNORECASE):
                hits.append(f"{name}:{number}: {text.strip()}")
    assert not hits, "issue numbers in code (say what the code does instead):\n" + "\n".join(hits)
