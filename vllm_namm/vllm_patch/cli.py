"""``vllm serve`` flags of the plugin, and their way into ``additional_config``.

vLLM builds its parser with ``EngineArgs.add_cli_args`` after loading general plugins, and
``EngineArgs.from_cli_args`` keeps dataclass fields only; we extend the first and move our
flags into ``additional_config[CONFIG_KEY]`` in the second.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from pydantic import ValidationError

from vllm_namm.config import EvictionConfig
from vllm_namm.policies.registry import KNOBS, OFF, POLICY_NAMES, KnobSpec, budget_takers, policy_class
from vllm_namm.rules import Conflict, first_conflict
from vllm_namm.vllm_patch.engine_config import CONFIG_KEY, NammConfigError, ParsedSettings
from vllm_namm.vllm_patch.patching import patch

FlagTable = Mapping[str, tuple[str, dict[str, Any]]]

POLICY_FLAG: FlagTable = MappingProxyType(
    {
        "--kv-eviction": (
            "policy",
            dict(
                choices=list(POLICY_NAMES),
                default=OFF,
                help=f"Eviction policy. '{OFF}' leaves vLLM unchanged.",
            ),
        ),
    }
)
ENGINE_FLAGS: FlagTable = MappingProxyType(
    {
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
                help="Token-level selection and namm: free a page when all / most / any of its (layer, head, "
                "token) entries are evicted.",
            ),
        ),
        "--kv-eviction-selection": (
            "selection",
            dict(
                choices=["page", "token"],
                default=None,
                help="Budget policies: keep the best whole pages within the budget (page, default), or each "
                "head's best tokens, then free pages by --kv-eviction-page-rule (token).",
            ),
        ),
        "--kv-eviction-page-score": (
            "page_score",
            dict(
                choices=["max", "mean", "vote"],
                default=None,
                help="Page-level selection: a page's score from its tokens' per-head normalised ranks over all "
                "layers and KV heads (max, default; mean; or the share a per-head token budget keeps).",
            ),
        ),
        "--kv-eviction-granularity": (
            "granularity",
            dict(
                choices=["shared", "layer"],
                default=None,
                help="Pages shared by every layer of a KV-cache group (shared, default), or every attention "
                "layer its own KV-cache group, freeing its own pages as the paper evicts per layer (layer; "
                "an experiment: more groups cost scheduler and metadata time).",
            ),
        ),
        "--kv-eviction-layer-budget": (
            "layer_budget",
            dict(
                choices=["uniform", "pyramid"],
                default=None,
                help="With --kv-eviction-granularity layer: the budget per layer is the same everywhere "
                "(uniform, default), or a pyramid (PyramidKV): more in the first layers, less in the last, "
                "the same total.",
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
        "--kv-eviction-prefix-cache-mib": (
            "prefix_cache_mib",
            dict(
                type=float,
                default=None,
                metavar="MIB",
                help="Eviction-aware prefix caching: memory per worker for the eviction states recorded at "
                "step boundaries, so that a request sharing a prefix with an earlier one (same settings) "
                "resumes from its compressed cache (default 256; 0 = off: an evicting request then "
                "prefills its whole prompt).",
            ),
        ),
    }
)
BUDGET_FLAGS: Mapping[str, str] = MappingProxyType(
    {"--kv-eviction-budget": "tokens", "--kv-eviction-ratio": "ratio"}
)


def knob_flag_options(spec: KnobSpec) -> dict[str, Any]:
    """argparse options of a policy knob's flag, from its declaration (type or choices, help, metavar)."""
    args = [a for a in typing.get_args(spec.field.annotation) if a is not type(None)]
    kind = args[0] if len(args) == 1 else spec.field.annotation
    options: dict[str, Any] = dict(default=None, help=spec.knob.help or spec.field.description)
    if typing.get_origin(kind) is Literal:
        options["choices"] = list(typing.get_args(kind))
    elif kind in (int, float):
        options["type"] = kind
    if spec.knob.metavar:
        options["metavar"] = spec.knob.metavar
    return options


# flag -> (EvictionConfig field path, argparse options). One table drives the parser, the config
# mapping and the error messages, so every message names the flag the user typed; the policies'
# knobs come from their declarations (``Knob(flag=...)``), right after the policy flag.
FLAGS: FlagTable = MappingProxyType(
    {
        **POLICY_FLAG,
        **{
            spec.knob.flag: (name, knob_flag_options(spec))
            for name, spec in KNOBS.items()
            if spec.knob.flag is not None and not spec.knob.request_only
        },
        **ENGINE_FLAGS,
    }
)


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
    """The ``additional_config[CONFIG_KEY]`` dict for these flags (None when eviction is off).

    Raises :class:`NammConfigError` with a message naming the offending flag(s).
    """
    cfg = eviction_config_from_args(args)
    return None if cfg is None else cfg.model_dump(mode="json")


def eviction_config_from_args(args: argparse.Namespace) -> EvictionConfig | None:
    """The eviction config these flags ask for (None when eviction is off).

    Raises :class:`NammConfigError` with a message naming the offending flag(s).
    """
    value = {flag: getattr(args, _dest(flag), options.get("default")) for flag, (_, options) in FLAGS.items()}
    given = [
        f for f, (_, options) in FLAGS.items() if f != "--kv-eviction" and value[f] != options.get("default")
    ]
    policy = value["--kv-eviction"]
    if not policy_class(policy).evicts:
        if given:
            raise NammConfigError(
                f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect without "
                f"--kv-eviction POLICY (the default, {OFF}, leaves vLLM unchanged)"
            )
        return None
    budget_flags = [f for f in BUDGET_FLAGS if value[f] is not None]
    knob_flags = [f for f, (path, _) in FLAGS.items() if path in KNOBS and value[f] is not None]
    conflict = first_conflict(
        policy,
        [BUDGET_FLAGS[f] for f in budget_flags],  # type: ignore[misc]
        [FLAGS[f][0] for f in knob_flags],
    )
    if conflict is not None:
        raise NammConfigError(flag_message(conflict))
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
    return cfg


def flag_message(conflict: Conflict) -> str:
    """A :class:`~vllm_namm.rules.Conflict` in the words of the flags."""
    p = conflict.policy
    if conflict.kind == "both_budgets":
        return "give --kv-eviction-budget or --kv-eviction-ratio, not both"
    if conflict.kind == "needs_budget":
        return f"--kv-eviction {p} needs --kv-eviction-budget TOKENS or --kv-eviction-ratio R"
    flag = _flag_of(conflict.subject)
    if conflict.kind == "takes_no_budget":
        return f"{flag} only applies to --kv-eviction {'/'.join(budget_takers())}, not {p}"
    if conflict.kind == "foreign_knob":
        return f"{flag} only applies to --kv-eviction {conflict.owner}, not {p}"
    return (
        f"{flag} with {_flag_of(conflict.budget)}: {conflict.owner} ranked under a budget keeps its "
        f"best-scored tokens; a {conflict.subject} does not apply"
    )


def _flag_of(setting: str) -> str:
    """The flag of a budget setting (tokens, ratio) or of a knob."""
    return next(f for f, (path, _) in FLAGS.items() if path in (setting, f"budget.{setting}"))


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
            cfg = eviction_config_from_args(args)
        except NammConfigError as e:
            fail(str(e))
        if cfg is not None:  # parsed here once: the engine config and every reader after it reuse it
            settings = ParsedSettings.of(cfg)
            engine_args.additional_config = dict(engine_args.additional_config or {}) | {CONFIG_KEY: settings}
        return engine_args

    @patch(EngineArgs, "create_engine_config")
    def create_engine_config(original, self, *a, **kw):
        from vllm_namm.vllm_patch.engine_config import prepare_engine_args
        from vllm_namm.vllm_patch.model_check import check_model

        try:
            prepare_engine_args(self)
            config = original(self, *a, **kw)
            reason = check_model(config)  # the model's config is known now; no engine has started
            if reason is not None:
                raise NammConfigError(f"--kv-eviction cannot serve this model: {reason}")
        except NammConfigError as e:
            if _is_cli():
                fail(str(e))
            raise
        return config


def _is_cli() -> bool:
    """True inside the ``vllm`` command (a clean exit beats a traceback there)."""
    import os

    return os.path.basename(sys.argv[0]) == "vllm"


__all__ = ["FLAGS", "EvictionConfig", "add_flags", "config_from_args", "flag_message", "install"]
