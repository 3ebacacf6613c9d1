"""Where a benchmark writes its results, and the command line printed beside its figures."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from benchmarks.launch import ROOT
from evolve.command import command_line as command_line  # re-exported: one owner, below benchmarks


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
