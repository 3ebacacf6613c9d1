"""Where a benchmark writes its results, and the command line printed beside its figures."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from benchmarks.launch import ROOT


def command_line(prog: str, argv: Sequence[str] | None = None) -> str:
    """``prog`` plus the arguments (``sys.argv[1:]`` by default), shell-quoted so it can be pasted."""
    return shlex.join([*prog.split(), *(sys.argv[1:] if argv is None else argv)])


def time_stamp() -> str:
    """When a run started, as its reports and default folder name say it."""
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def results_dir(name: str, stamp: str) -> Path:
    """The default output folder of one run: ``benchmarks/results/<name>-<stamp>``."""
    return ROOT / "benchmarks" / "results" / f"{name}-{stamp}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub table as lines: first column left-aligned, numbers right-aligned, padded to fit."""
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        padded = (
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "| " + " | ".join(padded) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
