"""Full-cache baseline completions (``kv_eviction=none``), computed once per prompt and cached on disk.

The cache stores the *completion*, not the score, keyed by model + prompt hash +
max_tokens + temperature: a metric fix never invalidates it, and the same prompt drawn
again in a later generation (or a later run) costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("evolve")

CACHE_VERSION = 1


class BaselineEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    prompt_sha256: str
    max_tokens: int
    temperature: float
    completion: str


class BaselineFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = CACHE_VERSION
    entries: dict[str, BaselineEntry] = Field(default_factory=dict)


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def baseline_key(model: str, prompt: str, max_tokens: int, temperature: float = 0.0) -> str:
    raw = json.dumps([model, prompt_hash(prompt), max_tokens, temperature])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


class BaselineCache:
    """A JSON file of full-cache completions; ``save`` is atomic (write + rename)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data = BaselineFile()
        self._dirty = False
        if self.path.is_file():
            try:
                self.data = BaselineFile.model_validate_json(self.path.read_text(encoding="utf-8"))
            except ValidationError as e:
                raise ValueError(
                    f"baseline cache {self.path} is corrupt or of another version: {e}"
                ) from None

    def __len__(self) -> int:
        return len(self.data.entries)

    def get(self, model: str, prompt: str, max_tokens: int, temperature: float = 0.0) -> str | None:
        e = self.data.entries.get(baseline_key(model, prompt, max_tokens, temperature))
        return None if e is None else e.completion

    def put(
        self, model: str, prompt: str, max_tokens: int, completion: str, temperature: float = 0.0
    ) -> None:
        self.data.entries[baseline_key(model, prompt, max_tokens, temperature)] = BaselineEntry(
            model=model,
            prompt_sha256=prompt_hash(prompt),
            max_tokens=max_tokens,
            temperature=temperature,
            completion=completion,
        )
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(self.data.model_dump_json(), encoding="utf-8")
        os.replace(tmp, self.path)
        self._dirty = False
