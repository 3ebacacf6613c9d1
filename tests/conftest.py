"""Shared fixtures for tests that run a real ``vllm serve`` on a tiny local model.

* ``tiny_model``: a 2-layer random Llama (head_dim 32) + character tokenizer, built once per session.
* ``server_pool``: session-scoped; keeps at most ONE server alive at a time (the machines running
  the suite have few cores), restarting only when a test asks for another configuration. Order the
  tests of a module by configuration to start each server once. A module that starts servers of
  its own closes the pool first.

The helpers (servers, requests, ``/metrics`` reads) live in :mod:`servers`; test modules import
them from there, never from another test module. Heavy tests are marked ``@pytest.mark.server``
(deselect with ``-m "not server"``).
"""

from __future__ import annotations

import triton_interpreter  # noqa: F401 - first: the Triton interpreter switch must precede any kernel import

# isort: split

from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import ServerPool


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.tiny_model import build_random_llama

    return build_random_llama(tmp_path_factory.mktemp("tiny_model") / "tiny", seed=0)


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(tmp_path_factory.mktemp("vllm_logs"))
    try:
        yield pool
    finally:
        pool.close()
