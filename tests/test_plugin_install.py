"""The plugin installs and loads without the tools' extras, and the tools name theirs (issue 30, item 5).

``pip install vllm-namm[cpu]`` must serve: here every module of the plugin is imported, and its
patches installed into vLLM, in a fresh interpreter in which the ``[evolve]``/``[bench]`` packages
cannot be imported by the plugin (a meta-path finder refuses them; vLLM itself may still import
the OpenAI client it depends on). ``python -m evolve`` and ``python -m benchmarks`` without their
extra stop with one line naming it (exit 2). No server is started.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from evolve.extras import EXTRAS

ROOT = Path(__file__).resolve().parent.parent
EXTRA_MODULES = sorted({m for modules in EXTRAS.values() for m in modules})

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        '''Refuse BLOCKED to importers named IMPORTERS (every importer when it is empty).'''

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] not in BLOCKED:
                return None
            frame = sys._getframe(1)
            while frame is not None and (
                frame.f_code.co_filename.startswith("<frozen importlib")
                or frame.f_globals.get("__name__", "").startswith("importlib")
            ):
                frame = frame.f_back
            importer = frame.f_globals.get("__name__", "") if frame is not None else ""
            if not IMPORTERS or importer.startswith(IMPORTERS):
                raise ModuleNotFoundError(f"blocked: {name} imported by {importer}", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def _run(blocked: list[str], importers: tuple[str, ...], body: str) -> subprocess.CompletedProcess[str]:
    code = f"BLOCKED = {set(blocked)!r}\nIMPORTERS = {importers!r}\n{BLOCKER}\n{textwrap.dedent(body)}"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )


def test_the_blocker_refuses_what_it_names() -> None:
    """The finder works: a blocked module does not import, for a named importer or for anyone."""
    anyone = _run(["json"], (), "import json")
    assert anyone.returncode == 1 and "blocked: json imported by __main__" in anyone.stderr
    named = _run(["json"], ("__main__",), "import importlib; importlib.import_module('json')")
    assert named.returncode == 1 and "blocked: json imported by __main__" in named.stderr
    other = _run(["json"], ("vllm_namm",), "import json; print('ok')")
    assert other.returncode == 0 and other.stdout.strip() == "ok", other.stderr


def test_the_plugin_loads_without_the_extras() -> None:
    """Every plugin module imports and the patches install with the extras refused to the plugin;
    the tools and the packages vLLM does not need stay out of the process."""
    result = _run(
        EXTRA_MODULES,
        ("vllm_namm", "namm_kernels"),
        """
        import pkgutil, sys
        import vllm_namm

        modules = [m.name for m in pkgutil.walk_packages(vllm_namm.__path__, "vllm_namm.")]
        for name in modules:
            __import__(name)
        vllm_namm.register()  # what vLLM calls in every process: the flags and the engine patches
        from vllm.engine.arg_utils import EngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm_namm.vllm_patch.engine_config import eviction_config

        parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
        flags = parser.parse_args(["--kv-eviction", "h2o", "--kv-eviction-ratio", "0.5"])
        policy = eviction_config(EngineArgs.from_cli_args(flags)).policy  # as `vllm serve` reads it
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in
                        {"evolve", "benchmarks", "cma", "matplotlib", "rouge_score"})
        print(len(modules), policy, loaded)
        """,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    count, policy, loaded = result.stdout.strip().splitlines()[-1].split(" ", 2)
    assert int(count) > 30 and policy == "h2o"
    assert loaded == "[]"


def test_python_m_evolve_names_its_extra() -> None:
    result = _run(
        ["cma"],
        (),
        """
        import runpy, sys
        sys.argv = ["python -m evolve", "--config", "evolve/configs/stage1_passkey.json"]
        runpy.run_module("evolve", run_name="__main__")
        """,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: python -m evolve needs the [evolve] extra (missing: cma): pip install -e '.[evolve]'"
    ]


def test_python_m_benchmarks_names_its_extra_but_the_demo_needs_none() -> None:
    quality = _run(
        ["matplotlib", "rouge_score"],
        (),
        """
        import sys
        from benchmarks.__main__ import main
        sys.exit(main(["quality", "--help"]))
        """,
    )
    assert quality.returncode == 2 and quality.stdout == ""
    assert quality.stderr.splitlines() == [
        "error: python -m benchmarks quality needs the [bench] extra (missing: matplotlib, rouge_score): "
        "pip install -e '.[bench]'"
    ]
    demo = _run(
        EXTRA_MODULES,
        ("benchmarks", "evolve", "vllm_namm"),
        """
        import sys
        from benchmarks.__main__ import main
        sys.exit(main(["demo", "--help"]))
        """,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "usage: python -m benchmarks demo" in demo.stdout


def test_setup_declares_the_extras_the_tools_check() -> None:
    """setup.py's extras (distribution names) and evolve/extras.py (import names) say the same; the
    plugin's own requirements hold none of them; ``[dev]`` (CI) has them all."""
    by_extra: dict[str, set[str]] = {}
    for req in importlib.metadata.requires("vllm-namm") or []:
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower().replace("-", "_")  # type: ignore[union-attr]
        extra = re.search(r"""extra\s*==\s*["'](\w+)["']""", req)
        by_extra.setdefault(extra.group(1) if extra else "", set()).add(name)
    for extra, modules in EXTRAS.items():
        assert by_extra[extra] == set(modules), extra
        assert by_extra[""].isdisjoint(modules)
        assert set(modules) <= by_extra["dev"]
    assert {"torch", "numpy", "pydantic", "safetensors"} <= by_extra[""]
