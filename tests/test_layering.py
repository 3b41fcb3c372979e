"""The house plan: kernels at the bottom, the checkpoint layer above, the CLI on top.

Every import of every module (top-level or inside a function) is read from the source;
an import of a layer above the importer's fails, and so does a project import made
inside a function (a lazy import is how a cycle hides). Optional third-party packages
may be imported lazily.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each package may import itself and the packages below it, nothing above.
MAY_IMPORT = {
    "kernels": {"kernels"},
    "calibration": {"kernels", "calibration"},
    "gelugemm_cli": {"kernels", "calibration", "gelugemm_cli"},
}


def project_imports(path: Path):
    """(line, imported project package, inside a function?) for every import in a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(inner) for f in functions for inner in ast.walk(f) if inner is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in MAY_IMPORT:
                yield node.lineno, top, id(node) in nested


# Deferred on purpose, not to dodge a cycle: the console entry point installs its start-up
# signal handling before the commands (and torch) are imported.
DEFERRED = {"gelugemm_cli/entry.py"}

MODULES = sorted(p for package in MAY_IMPORT for p in (ROOT / package).rglob("*.py"))


def test_every_package_is_checked():
    assert {p.relative_to(ROOT).parts[0] for p in MODULES} == set(MAY_IMPORT)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_runs_upward_or_hides_in_a_function(path):
    package = path.relative_to(ROOT).parts[0]
    for line, imported, lazy in project_imports(path):
        where = f"{path.relative_to(ROOT)}:{line}"
        assert imported in MAY_IMPORT[package], f"{where} imports {imported}, a layer above {package}"
        if str(path.relative_to(ROOT)) not in DEFERRED:
            assert not lazy, f"{where} imports {imported} inside a function: import it at the top"


def test_the_checker_sees_an_upward_and_a_lazy_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import torch\nfrom calibration.model import load_mlps\n\ndef f():\n    import kernels.op\n")
    assert list(project_imports(module)) == [(2, "calibration", False), (5, "kernels", True)]
