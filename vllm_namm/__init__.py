"""vllm-namm: Neural Attention Memory Models (arXiv 2410.13166) for vLLM.

The library part (features, scorers, policies, weights, reference runner) is plain
torch. Everything that touches vLLM internals lives in :mod:`vllm_namm.vllm_patch`
and is imported only by :func:`register`, vLLM's ``vllm.general_plugins`` hook.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point: add the CLI flags and, when eviction is on, the engine patches.

    vLLM calls this in every process (API server, engine core, workers), possibly
    more than once; the patch module makes it idempotent.
    """
    from vllm_namm.vllm_patch import install

    install()
