"""The optional dependencies of ``python -m evolve`` and ``python -m benchmarks``, checked up front.

The plugin needs none of them (``pip install vllm-namm`` serves); the tools name their extra in
one line instead of failing with a traceback deep in a run (``evolve.strategy`` imports cma at
the first generation, ``evolve.plot`` matplotlib after it). Import names here, distribution
names in ``setup.py``'s ``extras_require`` (``tests/test_plugin_install.py`` keeps them in step).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from types import MappingProxyType

EXTRAS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        # CMA-ES, the OpenAI client (and its httpx), progress bars, the training curve, LongBench's ROUGE
        "evolve": ("cma", "openai", "httpx", "tqdm", "matplotlib", "rouge_score"),
        # benchmarks run evolve's tasks, metrics and one generation, and plot what they measure
        "bench": ("cma", "openai", "httpx", "tqdm", "matplotlib", "rouge_score"),
    }
)


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (found without importing them)."""
    absent = []
    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            absent.append(module)
    return absent


def require(extra: str, command: str) -> None:
    """Exit with status 2 and one line naming the extra when a module of it is missing."""
    absent = missing(extra)
    if absent:
        print(
            f"error: {command} needs the [{extra}] extra (missing: {', '.join(absent)}): "
            f"pip install -e '.[{extra}]'",
            file=sys.stderr,
        )
        raise SystemExit(2)
