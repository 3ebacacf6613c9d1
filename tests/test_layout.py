"""The package's layering, read from the source with ``ast`` (nothing is imported or run).

The core (``vllm_namm``) must not depend on its own tools (``evolve``, ``benchmarks``), and the
kernels enter it through one door, :mod:`vllm_namm.kernels`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import vllm_namm

CORE = Path(vllm_namm.__file__).resolve().parent


def _imports(path: Path) -> set[str]:
    """Top-level package of every module ``path`` imports (at any depth in the file)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _core_modules() -> list[Path]:
    modules = sorted(CORE.rglob("*.py"))
    assert len(modules) > 20, f"found only {len(modules)} modules under {CORE}"
    return modules


def test_the_core_imports_neither_evolve_nor_benchmarks() -> None:
    offending = {
        str(p.relative_to(CORE)): sorted(_imports(p) & {"evolve", "benchmarks"}) for p in _core_modules()
    }
    assert {k: v for k, v in offending.items() if v} == {}


def test_only_the_kernels_facade_imports_namm_kernels() -> None:
    importers = sorted(str(p.relative_to(CORE)) for p in _core_modules() if "namm_kernels" in _imports(p))
    assert importers == ["kernels.py"]


def test_the_scan_sees_imports_inside_functions(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from evolve.x import y\n    import benchmarks.z\n")
    assert _imports(probe) == {"os", "evolve", "benchmarks"}


def test_no_test_module_imports_another() -> None:
    """Shared test helpers live in ``tests/servers.py`` (and fixtures in conftest): importing a
    test module would also collect its tests into the importer and run them twice."""
    tests = Path(__file__).resolve().parent
    modules = sorted(tests.glob("test_*.py"))
    assert len(modules) > 10, f"found only {len(modules)} test modules under {tests}"
    offending = {p.name: sorted(n for n in _imports(p) if n.startswith("test_")) for p in modules}
    assert {k: v for k, v in offending.items() if v} == {}
