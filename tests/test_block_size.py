"""The KV block size with eviction on: the smallest the backend supports unless the user chose one."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from vllm_namm.config import EvictionConfig
from vllm_namm.vllm_patch.block_size import choose_block_size
from vllm_namm.vllm_patch.engine_config import CONFIG_KEY, prepare_engine_args


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level and "block" in r.getMessage()]


@pytest.fixture
def logs() -> Iterator[Records]:
    """The plugin's log lines (vLLM's loggers do not propagate to pytest's root handler)."""
    handler, log = Records(), logging.getLogger("vllm.namm")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    yield handler
    log.removeHandler(handler)
    log.setLevel(level)


def engine_args(policy: str | None, **kwargs: Any) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    extra = {}
    if policy is not None:
        budget = None if policy in ("namm", "none") else {"ratio": 0.25}
        cfg = EvictionConfig(policy=policy, budget=budget)
        extra = {"additional_config": {CONFIG_KEY: cfg.model_dump(mode="json")}}
    return EngineArgs(model="x", **extra, **kwargs)


@pytest.mark.parametrize("policy", ["namm", "h2o"])
def test_eviction_without_block_size_gets_the_smallest_block_and_says_so(policy: str, logs: Records) -> None:
    args = engine_args(policy)
    assert args.block_size is None  # what vLLM's CPU platform would turn into 128
    prepare_engine_args(args)
    assert args.block_size == 32  # this CPU; 16 on a GPU
    assert [line for line in logs.lines(logging.INFO) if "KV block size 32" in line]
    assert not logs.lines(logging.WARNING)


def test_gpu_default_is_16(logs: Records) -> None:
    args = engine_args("namm")
    choose_block_size(args, on_cpu=False)
    assert args.block_size == 16 and logs.lines(logging.INFO)


@pytest.mark.parametrize("asked,warned", [(16, False), (32, False), (64, True), (128, True)])
def test_an_explicit_block_size_wins_with_a_warning_above_32(asked: int, warned: bool, logs: Records) -> None:
    args = engine_args("snapkv", block_size=asked)
    prepare_engine_args(args)
    assert args.block_size == asked
    warnings = logs.lines(logging.WARNING)
    assert bool(warnings) == warned
    assert not warned or f"--block-size {asked}" in warnings[0]
    assert not logs.lines(logging.INFO) or not any("KV block size" in w for w in logs.lines(logging.INFO))


@pytest.mark.parametrize("policy", [None, "none"])
def test_without_eviction_vllm_keeps_its_own_default(policy: str | None, logs: Records) -> None:
    args = engine_args(policy)
    prepare_engine_args(args)
    assert args.block_size is None and not logs.lines(logging.INFO) and not logs.lines(logging.WARNING)
