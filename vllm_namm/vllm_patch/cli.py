"""``vllm serve`` flags of the plugin, and their way into ``additional_config``.

vLLM builds its parser with ``EngineArgs.add_cli_args`` after loading general plugins, and
``EngineArgs.from_cli_args`` keeps dataclass fields only; we extend the first and move our
flags into ``additional_config["namm"]`` in the second.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pydantic import ValidationError

from vllm_namm.config import EvictionConfig
from vllm_namm.policy_registry import POLICY_NAMES, budget_takers, needs_budget, takes_budget
from vllm_namm.vllm_patch.engine_config import CONFIG_KEY, NammConfigError
from vllm_namm.vllm_patch.patching import patch

# flag -> (EvictionConfig field path, argparse options). One table drives the parser, the
# config mapping and the error messages, so every message names the flag the user typed.
FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--kv-eviction": (
        "policy",
        dict(
            choices=list(POLICY_NAMES), default="none", help="Eviction policy. 'none' leaves vLLM unchanged."
        ),
    ),
    "--namm-weights": (
        "weights",
        dict(
            default=None,
            metavar="PATH|NAME",
            help="NAMM weights (.safetensors), or a shipped name: 'evolved' (the default; evolved for our "
            "namm-tiny-llama from the L2 ranking, reads the key norm), 'evolved-attn' (evolved, attention "
            "features only), 'evolved-kn' (evolved, every layer free) or 'hand' (the hand-set starting point).",
        ),
    ),
    "--namm-threshold": (
        "threshold",
        dict(
            type=float,
            default=None,
            help="Keep tokens whose NAMM score is >= this (default: the weights file's, 0).",
        ),
    ),
    "--kv-eviction-interval": (
        "interval",
        dict(
            type=int,
            default=512,
            metavar="N",
            help="n_up: tokens between two eviction steps (a multiple of 16); prompts are chunked at "
            "these boundaries. Longer than --max-model-len: one step at the end of each prompt.",
        ),
    ),
    "--kv-eviction-budget": (
        "budget.tokens",
        dict(
            type=int,
            default=None,
            metavar="TOKENS",
            help="Cache budget in tokens for h2o/l2/streaming/snapkv.",
        ),
    ),
    "--kv-eviction-ratio": (
        "budget.ratio",
        dict(
            type=float,
            default=None,
            metavar="R",
            help="Cache budget as a fraction (0,1] of the cached tokens, for h2o/l2/streaming/snapkv.",
        ),
    ),
    "--kv-eviction-sink-tokens": (
        "protect.sink_tokens",
        dict(
            type=int,
            default=None,
            metavar="N",
            help="Oldest tokens never evicted (the first page is always kept).",
        ),
    ),
    "--kv-eviction-recent-tokens": (
        "protect.recent_tokens",
        dict(type=int, default=None, metavar="N", help="Newest tokens never evicted (default 1)."),
    ),
    "--kv-eviction-page-rule": (
        "page_rule",
        dict(
            choices=["all", "majority", "any"],
            default="all",
            help="Token-level selection and namm: free a page when all / most / any of its (layer, head, token) "
            "entries are evicted.",
        ),
    ),
    "--kv-eviction-selection": (
        "selection",
        dict(
            choices=["page", "token"],
            default=None,
            help="Budget policies: keep the best whole pages within the budget (page, default), or each head's best "
            "tokens, then free pages by --kv-eviction-page-rule (token).",
        ),
    ),
    "--kv-eviction-page-score": (
        "page_score",
        dict(
            choices=["max", "mean", "vote"],
            default=None,
            help="Page-level selection: a page's score from its tokens' per-head normalised ranks over all layers and "
            "KV heads (max, default; mean; or the share a per-head token budget keeps).",
        ),
    ),
    "--namm-kernels": (
        "kernels",
        dict(
            choices=["auto", "triton", "torch", "reference"],
            default="auto",
            help="Kernels of the eviction step: auto = Triton on GPU, exact fast torch on CPU; "
            "reference = the slow plain-torch definitions, for checking.",
        ),
    ),
    "--kv-eviction-lag": (
        "lag",
        dict(
            type=int,
            default=None,
            metavar="STEPS",
            help="Engine steps between an eviction step's start and its freed pages; the decision is "
            "computed off the critical path meanwhile (default 2; 0 = synchronous).",
        ),
    ),
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_flags(parser: argparse.ArgumentParser) -> None:
    if any(a.dest == "kv_eviction" for a in parser._actions):
        return
    g = parser.add_argument_group(
        "vllm-namm KV eviction",
        "Free KV-cache pages of running requests (NAMM, arXiv 2410.13166, and baselines).",
    )
    for flag, (_, options) in FLAGS.items():
        g.add_argument(flag, **options)


def config_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``additional_config["namm"]`` dict for these flags (None when eviction is off).

    Raises :class:`NammConfigError` with a message naming the offending flag(s).
    """
    value = {flag: getattr(args, _dest(flag), options.get("default")) for flag, (_, options) in FLAGS.items()}
    given = [
        f for f, (_, options) in FLAGS.items() if f != "--kv-eviction" and value[f] != options.get("default")
    ]
    policy = value["--kv-eviction"]
    if policy == "none":
        if given:
            raise NammConfigError(
                f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect without "
                "--kv-eviction POLICY (the default, none, leaves vLLM unchanged)"
            )
        return None
    budget_flags = [f for f in ("--kv-eviction-budget", "--kv-eviction-ratio") if value[f] is not None]
    if len(budget_flags) == 2:
        raise NammConfigError("give --kv-eviction-budget or --kv-eviction-ratio, not both")
    budget_policies = budget_takers()
    if needs_budget(policy) and not budget_flags:
        raise NammConfigError(
            f"--kv-eviction {policy} needs --kv-eviction-budget TOKENS or --kv-eviction-ratio R"
        )
    if not takes_budget(policy) and budget_flags:
        raise NammConfigError(
            f"{budget_flags[0]} only applies to --kv-eviction {'/'.join(budget_policies)}, not {policy}"
        )
    namm_flags = [f for f in ("--namm-weights", "--namm-threshold") if value[f] is not None]
    if policy != "namm" and namm_flags:
        raise NammConfigError(f"{namm_flags[0]} only applies to --kv-eviction namm, not {policy}")
    if budget_flags and value["--namm-threshold"] is not None:
        raise NammConfigError(
            f"--namm-threshold with {budget_flags[0]}: namm ranked under a budget keeps its "
            "best-scored tokens; a threshold does not apply"
        )
    raw: dict[str, Any] = {}
    for flag, (path, _) in FLAGS.items():
        if value[flag] is not None:
            *parents, leaf = path.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value[flag]
    try:
        cfg = EvictionConfig(**raw)
    except ValidationError as e:
        raise NammConfigError(flag_error(e, value)) from None
    return cfg.model_dump(mode="json")


def flag_error(e: ValidationError, value: dict[str, Any]) -> str:
    """The first error of ``e`` as one line naming the flag and the value given."""
    err = e.errors()[0]
    path = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    flags = [f for f, (p, _) in FLAGS.items() if p == path or p.startswith(path + ".")]
    flags = [f for f in flags if value.get(f) is not None] or flags
    if len(flags) == 1:
        return f"{flags[0]} {value[flags[0]]}: {msg}"
    return f"{'/'.join(flags)}: {msg}" if flags else msg


def fail(message: str) -> None:
    """One clear line on stderr, exit status 2 (like argparse)."""
    print(f"vllm-namm: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def install() -> None:
    from vllm.engine.arg_utils import EngineArgs

    @patch(EngineArgs, "add_cli_args")  # a staticmethod
    def add_cli_args(original, parser, *a, **kw):
        parser = original(parser, *a, **kw)
        add_flags(parser)
        return parser

    @patch(EngineArgs, "from_cli_args")  # a classmethod
    def from_cli_args(original, cls, args: argparse.Namespace):
        engine_args = original(cls, args)
        try:
            cfg = config_from_args(args)
        except NammConfigError as e:
            fail(str(e))
        if cfg is not None:
            engine_args.additional_config = dict(engine_args.additional_config or {}) | {CONFIG_KEY: cfg}
        return engine_args

    @patch(EngineArgs, "create_engine_config")
    def create_engine_config(original, self, *a, **kw):
        from vllm_namm.vllm_patch.engine_config import prepare_engine_args

        try:
            prepare_engine_args(self)
        except NammConfigError as e:
            if _is_cli():
                fail(str(e))
            raise
        return original(self, *a, **kw)


def _is_cli() -> bool:
    """True inside the ``vllm`` command (a clean exit beats a traceback there)."""
    import os

    return os.path.basename(sys.argv[0]) == "vllm"


__all__ = ["FLAGS", "EvictionConfig", "add_flags", "config_from_args", "install"]
