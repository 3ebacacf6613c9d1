"""Where the eviction settings live inside vLLM: ``additional_config[CONFIG_KEY]``.

Flags (``vllm serve ... --kv-eviction``) and the Python API
(``LLM(..., additional_config={CONFIG_KEY: {...}})``) both end up there; the engine config is
then adjusted once, in ``EngineArgs.create_engine_config`` (API-server process, before any
engine starts), so a bad setting stops the server with one clear message.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pydantic import ValidationError

from vllm_namm.config import EvictionConfig
from vllm_namm.policies.registry import policy_class
from vllm_namm.vllm_patch.block_size import choose_block_size
from vllm_namm.vllm_patch.patching import patch
from vllm_namm.weights import NAMESPACE

logger = logging.getLogger("vllm.namm")

CONFIG_KEY = NAMESPACE
"""Our key in vLLM's ``additional_config``: the eviction settings."""
SUMMARY_KEY = NAMESPACE
"""Our key in a finished request's ``kv_transfer_params``: its eviction summary (scheduler -> API server)."""
SCHEDULER_CLS = "vllm_namm.vllm_patch.scheduler.NammScheduler"
ATTENTION_OP = "vllm::unified_attention_with_output"
"""The op the piecewise graphs must split at, so that attention (and our hooks) runs eagerly."""


class NammConfigError(ValueError):
    """The eviction settings cannot work; the message says which and why."""


def parse_eviction_config(raw: Any) -> EvictionConfig:
    try:
        return raw if isinstance(raw, EvictionConfig) else EvictionConfig(**(raw or {}))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise NammConfigError(
            f"invalid eviction setting {where}: {msg}" if where else f"invalid eviction setting: {msg}"
        ) from None


class ParsedSettings(dict):
    """``additional_config[CONFIG_KEY]`` once parsed: the settings' JSON form (what vLLM hashes, logs
    and pickles), carrying the parsed :class:`EvictionConfig` in :attr:`config`.

    The flags (or, for the Python API, :func:`prepare_engine_args`) put one in the engine args; vLLM
    hands this very object to the ``VllmConfig`` it builds and pickles it to the engine and worker
    processes, so no reader there validates the settings again.
    """

    config: EvictionConfig

    @classmethod
    def of(cls, cfg: EvictionConfig) -> ParsedSettings:
        settings = cls(cfg.model_dump(mode="json"))
        settings.config = cfg
        return settings


_CACHE = "_namm_eviction_config"
"""Attribute of the owner (a ``VllmConfig`` or ``EngineArgs``) holding ``(raw, parsed)``."""


def eviction_config(owner: Any) -> EvictionConfig | None:
    """The eviction config of an engine, or None when eviction is off: the one way every part of the
    plugin reads it (flags, engine options, scheduler, runner, API server)."""
    cfg = settings_of(owner)
    return cfg if cfg is not None and policy_class(cfg.policy).evicts else None


def settings_of(owner: Any) -> EvictionConfig | None:
    """The parsed ``additional_config[CONFIG_KEY]`` of ``owner`` (None when absent), evicting or not.

    ``owner`` is a ``VllmConfig`` (or the ``EngineArgs`` it is made from). A :class:`ParsedSettings`
    is read as it is; a plain dict (``VllmConfig`` built by hand, or a copy that dropped the parsed
    config) is parsed and kept on the owner, next to the raw value it came from, so each engine's
    settings are parsed once per process and two engines in one process never share one.
    """
    raw = (getattr(owner, "additional_config", None) or {}).get(CONFIG_KEY)
    cached = vars(owner).get(_CACHE)
    if cached is None or cached[0] is not raw:
        cfg = getattr(raw, "config", None) if isinstance(raw, ParsedSettings) else None
        if cfg is None and raw is not None:
            cfg = parse_eviction_config(raw)
        cached = (raw, cfg)
        object.__setattr__(owner, _CACHE, cached)
    return cached[1]


def snapshots_possible(vllm_config: Any, kv_cache_config: Any) -> bool:
    """Whether eviction-aware prefix caching can work on this engine: vLLM's prefix caching on, no
    KV connector or KV-cache events (whose consumers would see the namespaced post-eviction blocks),
    and a single KV-cache group, so exactly one evicted group (a plain model with shared pages).

    The one place that decides it for the scheduler and the workers alike. A snapshot holds one
    request memory and a record one block list; with several groups (a hybrid model's sliding-window
    and full-attention groups, or ``--kv-eviction-granularity layer``'s group per layer) every
    evicted group has its own holes and policy states, and a hit would have to bring blocks for
    every group. There an evicting request records and resumes no snapshot: it skips the prefix
    cache and prefills its whole prompt (issue 27, item 1)."""
    events = getattr(vllm_config, "kv_events_config", None)
    return bool(
        vllm_config.cache_config.enable_prefix_caching
        and len(kv_cache_config.kv_cache_groups) == 1
        and getattr(vllm_config, "kv_transfer_config", None) is None
        and not (events is not None and getattr(events, "enable_kv_cache_events", False))
    )


def prepare_engine_args(args: Any) -> None:
    """Validate the eviction settings and set the engine options eviction needs.

    Eviction needs: our scheduler (frees the reported blocks, chunks prompts at NAMM
    boundaries), no async scheduling (it would race with freeing), attention outside CUDA
    graphs on GPU (:func:`piecewise_cuda_graphs`), no context parallelism and a lag with
    pipeline stages (:func:`check_parallelism`), and no speculative decoding; it wants small
    blocks (:func:`~vllm_namm.vllm_patch.block_size.choose_block_size`).
    """
    settings = settings_of(args)
    if settings is None:
        return
    if not isinstance(args.additional_config[CONFIG_KEY], ParsedSettings):  # the Python API's dict
        args.additional_config = dict(args.additional_config) | {CONFIG_KEY: ParsedSettings.of(settings)}
    cfg = eviction_config(args)
    if cfg is None:
        return
    from vllm_namm.policies import make_policy
    from vllm_namm.vllm_patch.served_weights import note_foreign_weights, weights_for_served_model

    cfg, chosen = weights_for_served_model(cfg, args.model)
    if chosen:  # the engine and workers read the settings from the engine args
        args.additional_config = dict(args.additional_config) | {CONFIG_KEY: ParsedSettings.of(cfg)}
    from vllm_namm.weights import WeightsError

    try:
        policy = make_policy(cfg)  # loads and checks the weights file now, not in the engine process
    except (WeightsError, ValueError, OSError) as e:
        raise NammConfigError(str(e)) from None
    note_foreign_weights(policy, cfg, args.model)
    check_parallelism(args, cfg)
    if args.speculative_config:
        raise NammConfigError("--kv-eviction does not support speculative decoding yet")
    from vllm.config import SchedulerConfig

    if args.scheduler_cls not in (None, SCHEDULER_CLS, SchedulerConfig.scheduler_cls):
        raise NammConfigError(
            f"--kv-eviction replaces the scheduler; drop --scheduler-cls {args.scheduler_cls}"
        )
    from vllm.platforms import current_platform

    if (
        cfg.kernels == "triton"
        and not current_platform.is_cuda_alike()
        and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        raise NammConfigError(
            f"--namm-kernels triton needs a CUDA or ROCm GPU (this platform: {current_platform.device_type}); "
            "use auto or torch"
        )
    args.scheduler_cls = SCHEDULER_CLS
    args.async_scheduling = False
    args.long_prefill_token_threshold = cfg.interval  # capped at the model length: cap_prefill_chunk
    args.enable_chunked_prefill = True
    choose_block_size(args, on_cpu=current_platform.is_cpu())
    if not current_platform.is_cpu():
        piecewise_cuda_graphs(args)
    tp, pp = args.tensor_parallel_size or 1, args.pipeline_parallel_size or 1
    logger.info(
        "vllm-namm: KV eviction %s, interval %d%s",
        cfg.policy,
        cfg.interval,
        f", {tp * pp} workers (tensor parallel {tp}, pipeline {pp}; page plans agreed over a gloo group)"
        if tp * pp > 1
        else "",
    )


def check_parallelism(args: Any, cfg: EvictionConfig) -> None:
    """Tensor parallelism is supported; pipeline and context parallelism are refused.

    * Pipeline parallel: the stages agree on a step's page plan through a collective; at lag 0 a
      stage waits inside its forward for a stage it has not yet handed activations to, and at
      lag >= 1 the vote still deadlocked against vLLM's ``sample_tokens`` RPC in our PP=2 test
      (engine timeout). The per-layer tallies (``page_plan.PageVotes``) are kept for a fix.
    * Decode/prefill context parallel: the ranks split each request's tokens, so no rank can
      read the keys a step scores.
    """
    if (args.pipeline_parallel_size or 1) > 1:
        raise NammConfigError(
            "--kv-eviction does not support --pipeline-parallel-size > 1 in vLLM 0.32: the stages must agree on "
            "every page plan, and that collective deadlocks against the pipeline's own sample_tokens RPC (with lag "
            "0 at once, with lag >= 1 the engine times out); use --tensor-parallel-size"
        )
    for flag, attr in (
        ("--decode-context-parallel-size", "decode_context_parallel_size"),
        ("--prefill-context-parallel-size", "prefill_context_parallel_size"),
    ):
        if (getattr(args, attr, 1) or 1) > 1:
            raise NammConfigError(
                f"--kv-eviction does not support {flag} > 1: the ranks would split each request's tokens, "
                "so none could read the keys an eviction step scores"
            )


def piecewise_cuda_graphs(args: Any) -> None:
    """GPU: CUDA graphs around everything but attention (``cudagraph_mode`` PIECEWISE).

    Why: eviction captures queries in a wrapper around the attention implementation's
    ``forward`` and compacts the block table and ``seq_lens`` every step in Python. vLLM's
    piecewise graphs split the compiled model at its attention ops
    (``CompilationConfig.splitting_ops``, the attention ops by default), which run eagerly
    between the graph pieces with metadata built each step, so both hooks keep working.
    Full CUDA graphs (FULL, FULL_DECODE_ONLY, FULL_AND_PIECEWISE, vLLM 0.32's default) replay
    attention too: the query-capturing wrapper would not run on replayed steps, so the decode
    steps they cover would never reach the policy; they stay off.
    Written from vLLM 0.32's source (``vllm/config/compilation.py``); untested on a GPU.
    """
    if args.enforce_eager:
        return
    from vllm.config.compilation import CompilationConfig, CompilationMode, CUDAGraphMode

    cc = args.compilation_config
    if cc is None:
        cc = args.compilation_config = CompilationConfig()
    elif isinstance(cc, dict):
        cc = args.compilation_config = CompilationConfig(**cc)
    asked = cc.cudagraph_mode
    if asked == CUDAGraphMode.NONE:
        return
    if cc.mode not in (
        None,
        CompilationMode.VLLM_COMPILE,
    ):  # no piecewise graphs: only full ones are possible
        cc.cudagraph_mode = CUDAGraphMode.NONE
        logger.warning(
            "vllm-namm: --kv-eviction turns CUDA graphs off under compilation mode %s (it has no "
            "piecewise graphs, and full ones would skip the eviction hooks)",
            cc.mode.name,
        )
        return
    if cc.pass_config.fuse_attn_quant and not cc.use_inductor_graph_partition:
        raise NammConfigError(
            "--kv-eviction needs attention outside CUDA graphs; attention+quant fusion (fuse_attn_quant) puts it "
            "inside full graphs: drop it or add --enforce-eager"
        )
    if cc.splitting_ops is not None and ATTENTION_OP not in cc.splitting_ops:
        raise NammConfigError(
            "--kv-eviction needs attention outside CUDA graphs: keep the attention ops in "
            "compilation_config.splitting_ops (the default) or add --enforce-eager"
        )
    cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
    if asked is not None and asked != CUDAGraphMode.PIECEWISE:
        logger.warning(
            "vllm-namm: --kv-eviction replaces cudagraph_mode %s by PIECEWISE (full CUDA graphs would "
            "replay attention without the eviction hooks)",
            asked.name,
        )
    logger.info(
        "vllm-namm: --kv-eviction on GPU: piecewise CUDA graphs, attention outside them (full CUDA graphs "
        "off: they would skip the eviction hooks); untested on a GPU"
    )


def cap_prefill_chunk(args: Any, max_model_len: int | None) -> None:
    """Cap the prompt-chunk limit (the interval) at the model length, once vLLM knows it.

    vLLM refuses ``long_prefill_token_threshold > max_model_len``; an interval that long
    means no step can fall inside a prompt, so the request gets a single eviction step when
    its prompt ends (kvpress-style one-shot compression). ``max_model_len`` is often None in
    the engine args (derived from the model's config), hence this runs right after
    ``EngineArgs.create_model_config``.
    """
    raw = (getattr(args, "additional_config", None) or {}).get(CONFIG_KEY)
    if raw is None or getattr(args, "scheduler_cls", None) != SCHEDULER_CLS or not max_model_len:
        return
    threshold = args.long_prefill_token_threshold or 0
    if threshold > max_model_len:
        args.long_prefill_token_threshold = max_model_len
        logger.info(
            "vllm-namm: eviction interval %d exceeds max_model_len %d: one eviction step at the end of "
            "each prompt (one-shot)",
            threshold,
            max_model_len,
        )


def install() -> None:
    _keep_v1_model_runner()
    _cap_prefill_chunk_after_model_config()


def _keep_v1_model_runner() -> None:
    """Keep the V1 model runner when eviction is on: 0.32 runs Model Runner V2 by default on
    GPU, whose block tables and metadata code our runner hooks do not cover yet."""
    from vllm.config import VllmConfig

    if not isinstance(VllmConfig.__dict__.get("use_v2_model_runner"), property):
        return

    @patch(VllmConfig, "use_v2_model_runner")  # a property: its getter is wrapped
    def use_v2_model_runner(original: Any, self: Any) -> bool:
        if eviction_config(self) is not None:
            return False
        return original(self)


def _cap_prefill_chunk_after_model_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    @patch(EngineArgs, "create_model_config")
    def create_model_config(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
        model_config = original(self, *args, **kwargs)
        cap_prefill_chunk(self, getattr(model_config, "max_model_len", None))
        return model_config
