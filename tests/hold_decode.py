"""A test-only vLLM logits processor that freezes the engine at a request's N-th decode token.

Why: a test that must see a request *while it decodes* (vLLM's KV gauge mid-decode, a client
that leaves mid-flight) cannot catch that moment by polling. The engine decodes the tiny model
at hundreds of tokens per second, and a busy API server can fall seconds behind it (one
``/metrics`` scrape took 14 s while 5 000 tokens were decoded), so any window of tokens can
pass unseen. Held here, the request stays running for as long as the test needs: the API
server catches up, and every scrape shows the state of the last step before the hold.

A server loads it with ``--logits-processors hold_decode:HoldDecode`` (this folder on its
``PYTHONPATH``: :data:`servers.HOLD_FLAGS`, :class:`servers.Hold`); a request asks for it with
``vllm_xargs={"hold_at": N, "hold_dir": DIR}``. Before the forward pass that would produce the
request's token N + 1, every worker writes ``DIR/held-<pid>`` (JSON: the request's tokens and
the number of requests in the running batch) and waits until ``DIR/release`` exists. Each
request is held once; the other requests wait with it. Logits pass through unchanged.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

MAX_HOLD_S = 900.0
"""A hold never outlives this (a test that died without releasing must not hang the server)."""


@dataclass
class _Hold:
    at: int
    folder: Path
    output: list[int]
    """The request's running output token list (vLLM keeps this reference up to date)."""
    done: bool = False


class HoldDecode(LogitsProcessor):
    """Blocks the engine step of a request's ``hold_at``-th + 1 token until the test releases it."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.holds: dict[int, _Hold] = {}
        self.batch_size = 0

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        extra = sampling_params.extra_args or {}
        if "hold_at" in extra and not (isinstance(extra["hold_at"], int) and "hold_dir" in extra):
            raise ValueError("hold_at must be an int, given with hold_dir")

    def is_argmax_invariant(self) -> bool:
        return False  # never skipped: greedy requests must be held too

    @staticmethod
    def _new(params: Any, _prompt: list[int] | None, output: list[int]) -> _Hold | None:
        extra = params.extra_args or {}
        if "hold_at" not in extra:
            return None
        return _Hold(int(extra["hold_at"]), Path(extra["hold_dir"]), output)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            self.batch_size = batch_update.batch_size
        process_dict_updates(self.holds, batch_update, self._new)
        for hold in self.holds.values():
            if not hold.done and len(hold.output) >= hold.at:
                hold.done = True
                self._wait(hold)

    def _wait(self, hold: _Hold) -> None:
        note = hold.folder / f"held-{os.getpid()}"
        tmp = note.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tokens": len(hold.output), "batch": self.batch_size}))
        tmp.replace(note)  # whole or absent for the test that waits for it
        deadline = time.monotonic() + MAX_HOLD_S
        while not (hold.folder / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.005)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
