"""The package's layering, read from the source with ``ast`` (nothing is imported or run).

A straight stack: ``vllm_namm`` (the plugin) < ``evolve`` < ``benchmarks``. The core depends on
neither tool nor on the tools' extras (cma, openai, matplotlib, ...), ``evolve`` never imports
``benchmarks``, and the kernels enter the core through one door, :mod:`vllm_namm.kernels`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import vllm_namm
from evolve.extras import EXTRAS

CORE = Path(vllm_namm.__file__).resolve().parent
ROOT = CORE.parent


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


def test_evolve_never_imports_benchmarks() -> None:
    """benchmarks may import evolve (tasks, metrics, a generation), never the reverse (issue 30)."""
    modules = sorted((ROOT / "evolve").rglob("*.py"))
    assert len(modules) > 15, f"found only {len(modules)} modules under evolve/"
    offending = {str(p.relative_to(ROOT)): "benchmarks" in _imports(p) for p in modules}
    assert [k for k, v in offending.items() if v] == []


def test_the_core_needs_none_of_the_extras() -> None:
    """``pip install vllm-namm`` serves without ``[evolve]`` or ``[bench]``: no core module imports
    their packages, not even lazily (tests/test_plugin_install.py checks the import at run time)."""
    extras = {m for modules in EXTRAS.values() for m in modules}
    assert {"cma", "openai", "matplotlib", "rouge_score"} <= extras
    offending = {str(p.relative_to(CORE)): sorted(_imports(p) & extras) for p in _core_modules()}
    assert {k: v for k, v in offending.items() if v} == {}


NAME_OWNERS = ("policies/namm.py", "policies/registry.py", "weights.py", "shipped_weights.py")
"""Where the string ``"namm"`` may appear in the core: the NAMM policy (its name), the registry (its
entry) and the weights code (the weights files' namespace, which is also vLLM's config key)."""


def test_no_policy_name_as_a_string_outside_its_own_file() -> None:
    """Issue 30: a policy's name is tested as a string only in its own file and the registry."""
    found = {
        str(p.relative_to(CORE)): [
            n.lineno
            for n in ast.walk(ast.parse(p.read_text(), filename=str(p)))
            if isinstance(n, ast.Constant) and n.value == "namm"
        ]
        for p in _core_modules()
    }
    assert found["policies/namm.py"] and found["policies/registry.py"], "the scan found no name at all"
    assert {k: v for k, v in found.items() if v and k not in NAME_OWNERS} == {}


def test_only_the_kernels_facade_imports_namm_kernels() -> None:
    importers = sorted(str(p.relative_to(CORE)) for p in _core_modules() if "namm_kernels" in _imports(p))
    assert importers == ["kernels.py"]


def test_the_scan_sees_imports_inside_functions(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from evolve.x import y\n    import benchmarks.z\n")
    assert _imports(probe) == {"os", "evolve", "benchmarks"}


def test_no_test_module_imports_another() -> None:
    """Shared test helpers live in ``tests/servers.py``, fixtures in conftest (which pytest loads
    itself): importing a test module would also collect its tests into the importer and run
    them twice, and importing conftest would give it a second owner of the helpers."""
    tests = Path(__file__).resolve().parent
    modules = sorted(tests.glob("test_*.py"))
    assert len(modules) > 10, f"found only {len(modules)} test modules under {tests}"
    offending = {
        p.name: sorted(n for n in _imports(p) if n.startswith("test_") or n == "conftest") for p in modules
    }
    assert {k: v for k, v in offending.items() if v} == {}


# ---- the import graph of the core -----------------------------------------------------------------
REGISTERED = re.compile(r"^vllm_namm(\.\w+)+:[A-Z]\w*$")
"""A class named by a registry entry, ``"vllm_namm.policies.h2o:H2OPolicy"``."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return [n for n in ast.walk(tree) if id(n) not in skipped]


def _core_graph() -> dict[str, set[str]]:
    """Module -> the core modules it imports at run time (at any depth, lazily or not). A
    ``"package.module:Class"`` string (the policy registry's entries) counts as an import."""
    modules = {_module_name(p): p for p in _core_modules()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                    ).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and REGISTERED.match(node.value)
            ):
                targets = [node.value.partition(":")[0]]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (empty when there is none)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_core_has_no_import_cycle() -> None:
    """Lazy imports inside functions count: a cycle they hide is still one (issue 30: the config
    needed the registry, which needed the policies, which needed the config)."""
    graph = _core_graph()
    assert "vllm_namm.policies.registry" in graph and graph["vllm_namm.config"], "the scan found no edges"
    assert _cycle(graph) == []


def test_policies_and_settings_sit_below_the_config() -> None:
    """The policies (and everything they use) never reach the config, the rules or the engine glue:
    the config is built on top of the registry, not the other way round."""
    graph = _core_graph()
    above = {"vllm_namm.config", "vllm_namm.rules", "vllm_namm.vllm_patch"}
    for low in (
        "vllm_namm.settings",
        "vllm_namm.policies.registry",
        "vllm_namm.policies",
        "vllm_namm.weights",
    ):
        reached = {m for m in _reachable(graph, low) if m in above or m.startswith("vllm_namm.vllm_patch.")}
        assert reached == set(), f"{low} imports {sorted(reached)}"
    assert graph["vllm_namm.settings"] == set()


def test_the_graph_scan_sees_lazy_and_relative_imports_and_registry_strings(tmp_path: Path) -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n\ndef f():\n    import b\n"
    )
    names = {n.names[0].name for n in _runtime_nodes(tree) if isinstance(n, ast.Import)}
    assert names == {"b"}
    graph = _core_graph()
    assert "vllm_namm.policies.namm" in graph["vllm_namm.policies.registry"]  # a "module:Class" string
    assert "vllm_namm.vllm_patch.api" in graph["vllm_namm.vllm_patch"]  # imported inside install()
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# ---- no module-level mutable state -------------------------------------------------------------------
MUTABLE_CALLS = {"list", "dict", "set", "defaultdict", "deque", "OrderedDict", "Counter", "bytearray"}
CACHES = {"cache", "lru_cache", "cached_property"}


def _mutable_module_state(path: Path) -> list[str]:
    """Where ``path`` keeps mutable state at module level: a container bound to a module name (constant
    tables are tuples, frozensets or ``MappingProxyType``), a ``global`` statement, a memoising cache."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = [
        f"line {n.lineno}: global {', '.join(n.names)}" for n in ast.walk(tree) if isinstance(n, ast.Global)
    ]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.col_offset == 0:
            for deco in node.decorator_list:
                name = ast.unparse(deco.func if isinstance(deco, ast.Call) else deco).rpartition(".")[2]
                if name in CACHES:
                    found.append(f"line {node.lineno}: @{name} on {node.name}")
    for node in tree.body:
        targets, value = [], None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        names = [ast.unparse(t) for t in targets]
        if value is None or names == ["__all__"]:
            continue
        mutable = isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp))
        if isinstance(value, ast.BinOp):  # [...] + [...]
            mutable = any(isinstance(side, (ast.List, ast.ListComp)) for side in (value.left, value.right))
        if isinstance(value, ast.Call):
            mutable = ast.unparse(value.func).rpartition(".")[2] in MUTABLE_CALLS
        if mutable:
            found.append(f"line {node.lineno}: {', '.join(names)}")
    return found


def test_no_module_holds_mutable_state() -> None:
    """Run-time state belongs to the objects that own it (the runner's state, the scheduler, the API
    server's input processor), so two engines in one process, or two tests, never share it."""
    offending = {str(p.relative_to(CORE)): _mutable_module_state(p) for p in _core_modules()}
    assert {k: v for k, v in offending.items() if v} == {}


def test_the_state_scan_sees_containers_globals_and_caches(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import functools\n__all__ = ['x']\nA = (1, 2)\n_pending = []\nB: dict = {}\nC = list()\nD = [1] + [2]\n"
        "@functools.lru_cache(maxsize=2)\ndef f():\n    global E\n"
    )
    assert [s.split(":")[0] for s in _mutable_module_state(probe)] == [
        "line 10",
        "line 9",
        "line 4",
        "line 5",
        "line 6",
        "line 7",
    ]


def test_no_core_file_is_long() -> None:
    """One concept per file (issue 30: about 350 lines at most)."""
    long = {
        str(p.relative_to(CORE)): n for p in _core_modules() if (n := len(p.read_text().splitlines())) > 350
    }
    assert long == {}
