"""One owner per setting (issue 30, item 2).

* The eviction config is parsed once per process and per engine: every reader goes through
  :func:`vllm_namm.vllm_patch.engine_config.eviction_config`; the flags (or the engine options)
  hand vLLM the parsed config with its JSON form, and a config built by hand keeps its parsed form
  on the ``VllmConfig`` it belongs to. Counted here by counting validations of
  :class:`~vllm_namm.config.EvictionConfig`, along ``vllm serve``'s and the Python API's whole way in.
* Requests' settings are applied to the server's config once per distinct setting (a process's
  :class:`~vllm_namm.vllm_patch.policy_book.PolicyBook`), and weights files load once per book.
* The budget/knob rules are written once (:mod:`vllm_namm.rules`) and every front end words them as
  before: each message below is byte for byte what the flags, the config model and ``vllm_xargs``
  said before the rules moved.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from vllm_namm import config as config_module
from vllm_namm.config import BudgetConfig, EvictionConfig
from vllm_namm.vllm_patch import engine_config
from vllm_namm.vllm_patch.cli import add_flags, eviction_config_from_args
from vllm_namm.vllm_patch.engine_config import (
    CONFIG_KEY,
    NammConfigError,
    eviction_config,
)
from vllm_namm.vllm_patch.policy_book import PolicyBook
from vllm_namm.vllm_patch.request_settings import (
    RequestSettingsError,
    parse_request_settings,
    validate_for_server,
)
from vllm_namm.weights import WeightsStore

H2O = {"policy": "h2o", "budget": {"ratio": 0.5}}


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every validation of an EvictionConfig from now on (its keyword arguments)."""
    calls: list[dict[str, Any]] = []
    original = EvictionConfig.__init__

    def counting(self: Any, **data: Any) -> None:
        calls.append(data)
        original(self, **data)

    monkeypatch.setattr(config_module.EvictionConfig, "__init__", counting)
    return calls


def _vllm_config(raw: dict[str, Any] | None) -> Any:
    from vllm.config import VllmConfig

    return VllmConfig(additional_config={} if raw is None else {CONFIG_KEY: raw})


def test_each_engine_config_is_parsed_once_per_process(validations: list[dict[str, Any]]) -> None:
    from vllm.config import VllmConfig

    engine_config.install()  # the use_v2_model_runner property reads the config on every access
    assert isinstance(VllmConfig.__dict__["use_v2_model_runner"], property)
    first = _vllm_config(H2O)  # VllmConfig reads that property while it is built
    cfg = eviction_config(first)
    for _ in range(50):
        assert eviction_config(first) is cfg
        assert first.use_v2_model_runner is False
    assert cfg is not None and cfg.policy == "h2o" and len(validations) == 1
    second = _vllm_config({"policy": "streaming", "budget": {"tokens": 64}})  # another engine, same process
    other = eviction_config(second)
    assert other is not None and other.policy == "streaming" and other.budget == BudgetConfig(tokens=64)
    assert eviction_config(first) is cfg and eviction_config(second) is other and len(validations) == 2
    assert eviction_config(_vllm_config(None)) is None and len(validations) == 2
    shipped = pickle.loads(pickle.dumps(first))  # as vLLM sends it to its engine and worker processes
    assert eviction_config(shipped) == cfg and len(validations) == 2
    first.additional_config = {
        CONFIG_KEY: {"policy": "l2", "budget": {"tokens": 32}}
    }  # changed: parsed again
    assert eviction_config(first).policy == "l2" and len(validations) == 3


@pytest.mark.parametrize("front", ["flags", "python"])
def test_vllm_serve_and_the_python_api_parse_once(
    front: str, tiny_model: Path, validations: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole way in, as ``vllm serve`` (flags -> ``EngineArgs.from_cli_args`` ->
    ``create_engine_config``) and ``LLM(additional_config=...)`` take it, then every reader of the
    engine config (the ``use_v2_model_runner`` property vLLM reads while building it, the scheduler,
    runner and API server, a copy pickled to the engine process): one validation in all."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_namm.vllm_patch import cli

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    cli.install()  # the flags and the engine-config patch, as vLLM's plugin loader installs them
    engine_config.install()
    common = ["--model", str(tiny_model), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024"]
    if front == "flags":
        parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
        flags = ["--kv-eviction", "h2o", "--kv-eviction-ratio", "0.25", "--kv-eviction-lag", "0"]
        engine_args = EngineArgs.from_cli_args(parser.parse_args(common + flags))
    else:
        raw = {"policy": "h2o", "budget": {"ratio": 0.25}, "lag": 0}
        engine_args = EngineArgs(
            model=str(tiny_model),
            dtype="float32",
            enforce_eager=True,
            max_model_len=1024,
            additional_config={CONFIG_KEY: raw},
        )
    vllm_config = engine_args.create_engine_config()
    assert engine_args.scheduler_cls == engine_config.SCHEDULER_CLS
    assert vllm_config.scheduler_config.long_prefill_token_threshold == 512
    cfg = eviction_config(vllm_config)
    assert cfg is not None and cfg.policy == "h2o" and cfg.budget == BudgetConfig(ratio=0.25)
    for _ in range(10):  # the scheduler (every finished request), the runner, the property
        assert eviction_config(vllm_config) is cfg and vllm_config.use_v2_model_runner is False
    PolicyBook(eviction_config(vllm_config))  # the API server's
    shipped = pickle.loads(pickle.dumps(vllm_config))  # the engine core's and the workers' copy
    assert eviction_config(shipped) == cfg
    assert len(validations) == 1


def test_a_bad_config_is_one_clear_error_every_time() -> None:
    broken = SimpleNamespace(additional_config={CONFIG_KEY: {"policy": "h2o"}})  # any holder of the settings
    for _ in range(2):
        with pytest.raises(NammConfigError, match=r"^invalid eviction setting: policy 'h2o' needs a budget"):
            eviction_config(broken)


def test_requests_apply_their_settings_once_and_load_weights_once(validations: list[dict[str, Any]]) -> None:
    server = EvictionConfig(policy="namm", weights="hand")
    book = PolicyBook(server)
    default = book.default
    plain = parse_request_settings({"namm_params": [0.0] * default.num_params})
    assert book.config(plain) is server and book.policy(plain) is default  # a candidate's vector: its states
    before = len(validations)
    streaming = parse_request_settings({"kv_eviction": "streaming", "kv_eviction_budget": 64})
    for _ in range(20):  # the scheduler asks at every arrival and every finish
        assert book.config(streaming).budget == BudgetConfig(tokens=64)
        assert book.policy(streaming).name == "streaming"
    assert len(validations) == before + 1
    threshold = parse_request_settings({"namm_threshold": 0.5})
    assert book.policy(threshold).weights is default.weights  # the same file, read once by the book's store


def test_the_weights_store_reads_each_file_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_namm import weights

    reads: list[Any] = []
    original = weights.load_weights
    monkeypatch.setattr(weights, "load_weights", lambda path: reads.append(path) or original(path))
    store = WeightsStore()
    assert store.get("hand") is store.get("hand") and len(reads) == 1
    assert store.get(None) is store.get(None) and len(reads) == 2  # None: the shipped default


# ---- the rules, written once, worded by each front end as before ------------------------------------
def _flags(*argv: str) -> str:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    with pytest.raises(NammConfigError) as e:
        eviction_config_from_args(parser.parse_args(list(argv)))
    return str(e.value)


def _config(**kw: Any) -> str:
    with pytest.raises(ValidationError) as e:
        EvictionConfig(**kw)
    return e.value.errors()[0]["msg"].removeprefix("Value error, ")


def _request(xargs: dict[str, Any], server: EvictionConfig) -> str:
    with pytest.raises(RequestSettingsError) as e:
        validate_for_server(parse_request_settings(xargs), server, lambda cfg: 7)
    return str(e.value)


NAMM_SERVER = EvictionConfig(policy="namm", interval=8192)
RATIO_SERVER = EvictionConfig(policy="namm", budget=BudgetConfig(ratio=0.3))
TAKERS = "h2o/l2/namm/snapkv/streaming"


@pytest.mark.parametrize(
    "got, want",
    [
        # both budgets
        (
            lambda: _flags("--kv-eviction", "l2", "--kv-eviction-budget", "8", "--kv-eviction-ratio", "0.5"),
            "give --kv-eviction-budget or --kv-eviction-ratio, not both",
        ),
        (
            lambda: _request(
                {"kv_eviction": "l2", "kv_eviction_budget": 8, "kv_eviction_ratio": 0.5}, NAMM_SERVER
            ),
            "vllm_xargs: give exactly one of kv_eviction_budget or kv_eviction_ratio",
        ),
        # a policy that needs a budget
        (
            lambda: _flags("--kv-eviction", "streaming"),
            "--kv-eviction streaming needs --kv-eviction-budget TOKENS or --kv-eviction-ratio R",
        ),
        (lambda: _config(policy="h2o"), "policy 'h2o' needs a budget (budget.tokens or budget.ratio)"),
        (
            lambda: _request({"kv_eviction": "h2o"}, NAMM_SERVER),
            "vllm_xargs.kv_eviction: h2o needs kv_eviction_budget or kv_eviction_ratio (this server has no budget)",
        ),
        # a policy that takes none
        (
            lambda: _config(policy="none", budget=BudgetConfig(ratio=0.5)),
            "policy 'none' takes no budget (only ['h2o', 'l2', 'namm', 'snapkv', 'streaming'])",
        ),
        (
            lambda: _request({"kv_eviction": "none", "kv_eviction_ratio": 0.5}, NAMM_SERVER),
            f"vllm_xargs.kv_eviction_ratio: only applies to kv_eviction {TAKERS}, this request runs none",
        ),
        # another policy's knob
        (
            lambda: _flags("--kv-eviction", "h2o", "--kv-eviction-budget", "64", "--namm-threshold", "0.5"),
            "--namm-threshold only applies to --kv-eviction namm, not h2o",
        ),
        (lambda: _config(threshold=0.1), "weights/threshold only apply to policy 'namm', not 'none'"),
        (
            lambda: _request({"kv_eviction": "none", "namm_params": [0.0]}, NAMM_SERVER),
            "vllm_xargs.namm_params: only valid with kv_eviction=namm, this request runs none",
        ),
        # a knob of the policy's own rule, under a budget
        (
            lambda: _flags("--kv-eviction", "namm", "--kv-eviction-ratio", "0.3", "--namm-threshold", "0.5"),
            "--namm-threshold with --kv-eviction-ratio: namm ranked under a budget keeps its best-scored "
            "tokens; a threshold does not apply",
        ),
        (
            lambda: _config(policy="namm", budget=BudgetConfig(ratio=0.3), threshold=0.5),
            "namm under a budget keeps its best-scored tokens: a threshold does not apply",
        ),
        (
            lambda: _request({"namm_threshold": 0.5}, RATIO_SERVER),  # the server's budget applies
            "vllm_xargs.namm_threshold: namm ranked under a budget keeps its best-scored tokens; a "
            "threshold does not apply",
        ),
        # a policy's own check (StreamingLLM's sinks), reported at the budget
        (
            lambda: _flags("--kv-eviction", "streaming", "--kv-eviction-budget", "3"),
            "--kv-eviction-budget 3: budget tokens (3) must exceed streaming_sinks (4)",
        ),
        (
            lambda: _request({"kv_eviction": "streaming", "kv_eviction_budget": 3}, NAMM_SERVER),
            "vllm_xargs.kv_eviction_budget: budget tokens (3) must exceed streaming_sinks (4)",
        ),
        (
            lambda: _parse_message({"policy": "streaming", "budget": {"tokens": 3}}),
            "invalid eviction setting budget: budget tokens (3) must exceed streaming_sinks (4)",
        ),
        # and the server that does not evict
        (
            lambda: _request({"kv_eviction": "namm"}, EvictionConfig()),
            "vllm_xargs.kv_eviction: this server runs with --kv-eviction none; start it with a policy to "
            "evict per request",
        ),
    ],
)
def test_every_front_end_words_the_rules_as_before(got: Any, want: str) -> None:
    assert got() == want


def _parse_message(raw: dict[str, Any]) -> str:
    with pytest.raises(NammConfigError) as e:
        engine_config.parse_eviction_config(raw)
    return str(e.value)
