"""``vllm serve`` flags of the plugin, and their way into ``additional_config``.

vLLM builds its parser with ``EngineArgs.add_cli_args`` after loading general plugins, and
``EngineArgs.from_cli_args`` keeps dataclass fields only; we extend the first and move our
flags into ``additional_config["namm"]`` in the second.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

from vllm_namm.config import EvictionConfig
from vllm_namm.vllm_patch.engine_config import CONFIG_KEY, NammConfigError, parse_eviction_config

POLICY_CHOICES = ["none", "namm", "h2o", "l2", "streaming", "snapkv"]


def add_flags(parser: argparse.ArgumentParser) -> None:
    if any(a.dest == "kv_eviction" for a in parser._actions):
        return
    g = parser.add_argument_group(
        "vllm-namm KV eviction",
        "Free KV-cache pages of running requests (NAMM, arXiv 2410.13166, and baselines).",
    )
    g.add_argument("--kv-eviction", choices=POLICY_CHOICES, default="none",
                   help="Eviction policy. 'none' leaves vLLM unchanged.")
    g.add_argument("--namm-weights", default=None, metavar="PATH",
                   help="NAMM weights (.safetensors). Default: the shipped initial weights.")
    g.add_argument("--namm-threshold", type=float, default=None,
                   help="Keep tokens whose NAMM score is >= this (default: the weights file's, 0).")
    g.add_argument("--kv-eviction-interval", type=int, default=512, metavar="N",
                   help="n_up: tokens between two eviction steps; prompts are chunked at these boundaries.")
    g.add_argument("--kv-eviction-budget", type=int, default=None, metavar="TOKENS",
                   help="Cache budget in tokens for h2o/l2/streaming/snapkv.")
    g.add_argument("--kv-eviction-ratio", type=float, default=None, metavar="R",
                   help="Cache budget as a fraction (0,1] of the cached tokens, for h2o/l2/streaming/snapkv.")
    g.add_argument("--kv-eviction-sink-tokens", type=int, default=None, metavar="N",
                   help="Oldest tokens never evicted (the first page is always kept).")
    g.add_argument("--kv-eviction-recent-tokens", type=int, default=None, metavar="N",
                   help="Newest tokens never evicted (default 1).")
    g.add_argument("--kv-eviction-page-rule", choices=["all", "majority", "any"], default="all",
                   help="Token-level selection and namm: free a page when all / most / any of its (layer, head, "
                        "token) entries are evicted.")
    defaults = EvictionConfig.model_fields  # one source of truth for flags and the Python API
    g.add_argument("--kv-eviction-selection", choices=["page", "token"], default=defaults["selection"].default,
                   help="Budget policies: keep the best whole pages within the budget (page), or each head's "
                        "best tokens, then free pages by --kv-eviction-page-rule (token).")
    g.add_argument("--kv-eviction-page-score", choices=["max", "mean", "vote"], default=defaults["page_score"].default,
                   help="Page-level selection: a page's score from its tokens' per-head normalised ranks over "
                        "all layers and KV heads (max, mean, or the share a per-head token budget keeps).")
    g.add_argument("--namm-kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="Attention-column kernels of the eviction step: auto = Triton on GPU, torch on CPU.")


def config_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``additional_config["namm"]`` dict for these flags (None when eviction is off)."""
    if getattr(args, "kv_eviction", "none") == "none":
        return None
    raw: dict[str, Any] = {"policy": args.kv_eviction, "interval": args.kv_eviction_interval,
                           "page_rule": args.kv_eviction_page_rule, "kernels": args.namm_kernels}
    raw |= {"selection": args.kv_eviction_selection, "page_score": args.kv_eviction_page_score}
    if args.namm_weights is not None:
        raw["weights"] = args.namm_weights
    if args.namm_threshold is not None:
        raw["threshold"] = args.namm_threshold
    if args.kv_eviction_budget is not None or args.kv_eviction_ratio is not None:
        raw["budget"] = {"tokens": args.kv_eviction_budget, "ratio": args.kv_eviction_ratio}
    protect = {}
    if args.kv_eviction_sink_tokens is not None:
        protect["sink_tokens"] = args.kv_eviction_sink_tokens
    if args.kv_eviction_recent_tokens is not None:
        protect["recent_tokens"] = args.kv_eviction_recent_tokens
    if protect:
        raw["protect"] = protect
    return parse_eviction_config(raw).model_dump(mode="json")


def fail(message: str) -> None:
    """One clear line on stderr, exit status 2 (like argparse)."""
    print(f"vllm-namm: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def install() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, "_namm_cli_installed", False):
        return
    EngineArgs._namm_cli_installed = True
    orig_add = EngineArgs.add_cli_args
    orig_from = EngineArgs.from_cli_args.__func__
    orig_create = EngineArgs.create_engine_config

    @functools.wraps(orig_add)
    def add_cli_args(parser, *a, **kw):
        parser = orig_add(parser, *a, **kw)
        add_flags(parser)
        return parser

    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = orig_from(cls, args)
        try:
            cfg = config_from_args(args)
        except NammConfigError as e:
            fail(str(e))
        if cfg is not None:
            engine_args.additional_config = dict(engine_args.additional_config or {}) | {CONFIG_KEY: cfg}
        return engine_args

    @functools.wraps(orig_create)
    def create_engine_config(self, *a, **kw):
        from vllm_namm.vllm_patch.engine_config import prepare_engine_args

        try:
            prepare_engine_args(self)
        except NammConfigError as e:
            if _is_cli():
                fail(str(e))
            raise
        return orig_create(self, *a, **kw)

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config


def _is_cli() -> bool:
    """True inside the ``vllm`` command (a clean exit beats a traceback there)."""
    import os

    return os.path.basename(sys.argv[0]) == "vllm"


__all__ = ["EvictionConfig", "add_flags", "config_from_args", "install"]
