"""The house plan: kernels at the bottom, the checkpoint layer above, the CLI on top.

Every import of every module (top-level or inside a function) is read from the source;
an import of a layer above the importer's fails, and so does a project import made
inside a function (a lazy import is how a cycle hides). Optional third-party packages
may be imported lazily.

Tests: no module in tests/ imports a test module (tests/test_*.py). What several test
modules share lives in conftest.py (fixtures, tolerances, markers) or in a helper module
(checkpoints.py, hf_models.py, int8_helpers.py, bench_helpers.py).
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


# ---- tests import helpers, never each other ---------------------------------------------------

TESTS = ROOT / "tests"


def imports_of_test_modules(path: Path):
    """(line, module) for every import of a test module (test_*.py) in a module, wherever it
    stands: `import test_x`, `from test_x import f`, `from tests.test_x import f`,
    `from tests import test_x`, `from .test_x import f`, `from . import test_x`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            package = node.module or ""
            names = [package] + [f"{package}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.strip(".").split(".")
            if parts[0] == "tests":
                parts = parts[1:]
            if parts and parts[0].startswith("test_"):
                yield node.lineno, parts[0]
                break


def test_no_test_module_imports_another():
    modules = sorted(TESTS.glob("*.py"))
    assert {"conftest.py", "test_layering.py", "int8_helpers.py"} <= {p.name for p in modules}
    imported = [f"{p.name}:{line} imports {module}" for p in modules for line, module in imports_of_test_modules(p)]
    assert not imported, "move what is shared into tests/conftest.py or a helper module: " + "; ".join(imported)


def test_the_checker_sees_every_form_of_a_test_module_import(tmp_path):
    module = tmp_path / "test_m.py"
    module.write_text(
        "import torch\nfrom conftest import rel_err\nfrom int8_helpers import test_weight\nimport test_w8a8\n"
        "from test_w8a16 import quantize_weight\nfrom tests.test_bench import cpu_run\nfrom tests import test_op\n"
        "from .test_gemm import run_case\nfrom . import test_gated\n\ndef f():\n    from test_module import D_MODEL\n"
    )  # fmt: skip
    assert sorted(imports_of_test_modules(module)) == [
        (4, "test_w8a8"), (5, "test_w8a16"), (6, "test_bench"), (7, "test_op"), (8, "test_gemm"), (9, "test_gated"),
        (12, "test_module"),
    ]  # fmt: skip


def test_the_sm90_skip_is_written_once():
    # A test that runs a TMA path is marked `tma` (conftest.on_paths for a path parameter);
    # conftest alone asks the GPU its capability and skips it below SM90.
    def asks(path):
        names = (n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, (ast.Attribute, ast.Name)))  # fmt: skip
        return "get_device_capability" in names

    assert [p.name for p in sorted(TESTS.glob("*.py")) if asks(p)] == ["conftest.py"]
