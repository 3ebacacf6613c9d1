"""The documentation holds together: every relative link resolves, the README is a front door.

Checked in README.md, docs/**/*.md and evolve/README.md: every relative markdown link and image
(inline ``[text](target)``, reference definitions ``[label]: target``, ``<img src="...">``)
names an existing file, and a ``#anchor`` names a heading of the target file, slugged as GitHub
does. Links inside fenced code blocks and inline code are not links. No vLLM, no network.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results"

# CI and the acceptance run these two lines as they are written here.
DEMO_COMMAND = "bash scripts/install.sh && .venv/bin/python -m benchmarks demo"
TEST_COMMAND = "bash scripts/install.sh && .venv/bin/python -m pytest -q -ra"
MAX_README_LINES = 250

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
IMG_SRC = re.compile(r"<img\b[^>]*\bsrc=[\"']([^\"']+)[\"']", re.IGNORECASE)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


def doc_files() -> list[Path]:
    files = [README, ROOT / "evolve" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [f for f in files if f.exists()]


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * 3
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            yield number, line


def links(text: str) -> Iterator[tuple[int, str]]:
    for number, line in prose_lines(text):
        line = INLINE_CODE.sub("", line)
        for pattern in (INLINE_LINK, REFERENCE_DEF, IMG_SRC):
            for m in pattern.finditer(line):
                yield number, m.group(1)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    errors = []
    for number, target in links(path.read_text(encoding="utf-8")):
        if not target or SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not dest.exists():
            errors.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            errors.append(f"{where}: no heading #{anchor} in {dest.relative_to(root)}")
    return errors


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_the_checker_sees_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# Part one: `x` & y\n\n## Part one: `x` & y\n")
    doc = tmp_path / "a.md"
    doc.write_text(
        "[ok](b.md#part-one-x--y) [ok](b.md#part-one-x--y-1) [ok](#top) ![img](missing.png)\n"
        "# Top\n[bad](b.md#part-two) `[code](nowhere.md)` [web](https://example.com/x)\n"
        "```\n[in a fence](nowhere.md)\n```\n[ref]: gone.md\n"
    )
    errors = broken_links(doc, root=tmp_path)
    assert [e.split(": ")[1] for e in errors] == ["missing.png", "b.md#part-two", "gone.md"]


def test_readme_is_a_front_door() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"
    assert lines[0].startswith("# "), "README.md starts with its title"
    # what it is first: a paragraph of prose before the first section
    first_section = next(i for i, line in enumerate(lines) if line.startswith("## "))
    what = " ".join(
        line for line in lines[1:first_section] if line.strip() and not line.startswith(("```", "#"))
    )
    assert len(what.split()) >= 30, "README.md opens with what it is, before its first section"
    # then the two commands, exactly as CI runs them, before the second section
    assert DEMO_COMMAND in lines and TEST_COMMAND in lines, "the install + demo and install + tests commands"
    sections = [i for i, line in enumerate(lines) if line.startswith("## ")]
    second_section = sections[1] if len(sections) > 1 else len(lines)
    assert lines.index(DEMO_COMMAND) < second_section and lines.index(TEST_COMMAND) < second_section


def test_readme_has_one_date() -> None:
    """Studies live in docs/results/; the front door carries only its headline table's date."""
    text = README.read_text(encoding="utf-8")
    text = re.sub(r"\]\([^)]*\)", "]", text)  # a link target to a dated file is no date
    assert len(set(DATE.findall(text))) <= 1, sorted(set(DATE.findall(text)))


def test_every_study_is_dated_indexed_and_has_its_command() -> None:
    index = (RESULTS / "README.md").read_text(encoding="utf-8")
    listed = {Path(t).name for _, t in links(index)}
    studies = sorted(p for p in RESULTS.glob("*.md") if p.name != "README.md")
    assert studies, "docs/results/ holds the measured studies"
    for study in studies:
        date = DATE.match(study.name)
        assert date and study.name[10] == "-", f"{study.name}: named YYYY-MM-DD-topic.md"
        text = study.read_text(encoding="utf-8")
        assert date.group() in text, f"{study.name}: says its date"
        assert re.search(r"python -m |vllm (serve|bench)", text), f"{study.name}: gives its command"
        assert study.name in listed, f"{study.name}: listed in docs/results/README.md"
