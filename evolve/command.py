"""The command line a run records beside its results (weights provenance, benchmark reports).

It lives in ``evolve`` because ``evolve.fit`` records it and ``benchmarks`` sits above ``evolve``
(benchmarks may import evolve, never the reverse): :mod:`benchmarks.results` re-exports it.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence


def command_line(prog: str, argv: Sequence[str] | None = None) -> str:
    """``prog`` plus the arguments (``sys.argv[1:]`` by default), shell-quoted so it can be pasted."""
    return shlex.join([*prog.split(), *(sys.argv[1:] if argv is None else argv)])
