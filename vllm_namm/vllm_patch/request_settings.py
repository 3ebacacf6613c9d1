"""Per-request eviction settings carried in ``vllm_xargs`` (``SamplingParams.extra_args``).

Keys we own: ``kv_eviction``, ``kv_eviction_budget``, ``kv_eviction_ratio``, and every key a policy
declares for its knobs (:class:`~vllm_namm.settings.Knob`; NAMM's ``namm_params``, ``namm_threshold``
and ``namm_ema_coeff_per_step``, the EMA coefficient per query step, so that evolution can search
gamma, the paper's App. D fix for needle retrieval). Any other key starting with ``kv_eviction`` or
with the name of a policy that declares keys (``namm_``) is rejected, so that a typo is a 400 rather
than silently ignored; keys of other plugins pass through untouched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Annotated, Any, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WrapValidator,
    field_validator,
)
from pydantic import create_model as _create_model

from vllm_namm.config import EvictionConfig, PolicyName
from vllm_namm.policies.registry import KNOBS, budget_takers, policy_class
from vllm_namm.rules import Conflict, first_conflict, inherits_budget

BUDGET_KEYS: Mapping[str, str] = MappingProxyType(
    {"kv_eviction_budget": "tokens", "kv_eviction_ratio": "ratio"}
)
KEY_KNOBS: Mapping[str, str] = MappingProxyType(
    {spec.knob.key: name for name, spec in KNOBS.items() if spec.knob.key is not None}
)
"""Per-request key -> the knob (settings field) it sets."""
OUR_PREFIXES = ("kv_eviction", *dict.fromkeys(f"{KNOBS[name].owner}_" for name in KEY_KNOBS.values()))


class RequestCore(BaseModel):
    """The engine's own per-request keys (the policies' keys are added to it: :data:`RequestSettings`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kv_eviction: PolicyName | None = None
    kv_eviction_budget: int | None = Field(None, gt=0)
    kv_eviction_ratio: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools(cls, v: Any) -> Any:
        """``True`` is no budget, ratio or policy (pydantic would read it as 1)."""
        if isinstance(v, bool) or (isinstance(v, (list, tuple)) and any(isinstance(x, bool) for x in v)):
            raise ValueError("must not be a boolean")
        return v

    @property
    def is_default(self) -> bool:
        return all(getattr(self, name) is None for name in type(self).model_fields)

    @property
    def overrides_config(self) -> bool:
        """Whether the request changes the server's config (not only its own policy states)."""
        return any(k not in KEY_KNOBS or not KNOBS[KEY_KNOBS[k]].knob.request_only for k in self.given())

    def given(self) -> list[str]:
        """The keys this request sets, in declaration order."""
        return [k for k in type(self).model_fields if getattr(self, k) is not None]

    def cache_key(self) -> str:
        """Identity of the policy these settings build (per-request-only knobs excluded: they live in
        the request's policy states)."""
        data = self.model_dump(exclude={k for k, n in KEY_KNOBS.items() if KNOBS[n].knob.request_only})
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def state_options(self) -> dict[str, Any]:
        """The per-request-only knobs given, by settings name: arguments of the policy's ``new_state``."""
        return {
            KEY_KNOBS[k]: getattr(self, k)
            for k in self.given()
            if k in KEY_KNOBS and KNOBS[KEY_KNOBS[k]].knob.request_only
        }

    def apply(self, server: EvictionConfig) -> EvictionConfig:
        """The server's config with this request's overrides (validated again as a whole).

        The request's policy keeps the server's budget only where :func:`~vllm_namm.rules.inherits_budget`
        says so, and the server's knobs only if they are its own; its keys override them."""
        data = server.model_dump()
        policy = self.kv_eviction or server.policy
        data["policy"] = policy
        if self.kv_eviction_budget is not None or self.kv_eviction_ratio is not None:
            data["budget"] = {"tokens": self.kv_eviction_budget, "ratio": self.kv_eviction_ratio}
        elif not inherits_budget(policy, server):
            data["budget"] = None
        for name, spec in KNOBS.items():
            if not spec.knob.request_only and spec.owner != policy:
                data[name] = spec.field.default
        for key in self.given():
            name = KEY_KNOBS.get(key)
            if name is not None and not KNOBS[name].knob.request_only:
                data[name] = getattr(self, key)
        return EvictionConfig(**data)


VALIDATORS = (AfterValidator, BeforeValidator, PlainValidator, WrapValidator)


def _request_field(name: str) -> tuple[Any, Any]:
    """A knob as an optional request key: its checks, on the value when one is given."""
    field = KNOBS[name].field
    checks = [m for m in field.metadata if isinstance(m, VALIDATORS)]
    bounds = [m for m in field.metadata if not isinstance(m, VALIDATORS)]
    inner = Annotated[(field.annotation, *checks)] if checks else field.annotation
    return Annotated[(Optional[inner], *bounds)], Field(None, description=field.description)  # noqa: UP045


RequestSettings = _create_model(
    "RequestSettings",
    __base__=RequestCore,
    __module__=__name__,
    **{key: _request_field(name) for key, name in KEY_KNOBS.items()},
)
RequestSettings.__doc__ = "Our ``vllm_xargs`` keys: the engine's and every policy's (None = the server's)."


class RequestSettingsError(ValueError):
    """A request's ``vllm_xargs`` eviction settings are invalid (-> HTTP 400)."""


def parse_request_settings(extra_args: dict[str, Any] | None) -> RequestSettings:
    """Our keys of ``extra_args`` as validated settings; raises :class:`RequestSettingsError`."""
    ours = {k: v for k, v in (extra_args or {}).items() if k.startswith(OUR_PREFIXES)}
    if not ours:
        return RequestSettings()
    try:
        return RequestSettings(**ours)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "vllm_xargs"
        msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
        raise RequestSettingsError(f"vllm_xargs.{where}: {msg}") from None


def request_message(conflict: Conflict) -> str:
    """A :class:`~vllm_namm.rules.Conflict` in the words of ``vllm_xargs`` (its keys)."""
    p = conflict.policy
    key = {v: k for k, v in BUDGET_KEYS.items()}.get(conflict.subject) or knob_key(conflict.subject)
    if conflict.kind == "both_budgets":
        return "vllm_xargs: give exactly one of kv_eviction_budget or kv_eviction_ratio"
    if conflict.kind == "needs_budget":
        return f"vllm_xargs.kv_eviction: {p} needs kv_eviction_budget or kv_eviction_ratio (this server has no budget)"
    if conflict.kind == "takes_no_budget":
        return f"vllm_xargs.{key}: only applies to kv_eviction {'/'.join(budget_takers())}, this request runs {p}"
    if conflict.kind == "foreign_knob":
        return f"vllm_xargs.{key}: only valid with kv_eviction={conflict.owner}, this request runs {p}"
    return (
        f"vllm_xargs.{key}: {conflict.owner} ranked under a budget keeps its best-scored tokens; "
        f"a {conflict.subject} does not apply"
    )


def knob_key(name: str) -> str:
    return KNOBS[name].knob.key or name if name in KNOBS else name


def validate_for_server(
    settings: RequestSettings, server: EvictionConfig, num_params: Callable[[EvictionConfig], int]
) -> None:
    """Check the request's settings make sense on this server; raises RequestSettingsError.

    ``num_params(cfg)`` gives the scorer size of the policy ``cfg`` builds (asked only when the request
    brings a parameter vector). A key that would be silently ignored (a budget for namm, a threshold
    for streaming) is an error too.
    """
    if settings.is_default:
        return
    if not policy_class(server.policy).evicts and settings.kv_eviction is not None:
        if policy_class(settings.kv_eviction).evicts:
            raise RequestSettingsError(
                f"vllm_xargs.kv_eviction: this server runs with --kv-eviction {server.policy}; start it with a "
                "policy to evict per request"
            )
    policy = settings.kv_eviction or server.policy
    given = settings.given()
    budget_keys = [k for k in BUDGET_KEYS if k in given]
    conflict = first_conflict(
        policy,
        [BUDGET_KEYS[k] for k in budget_keys],  # type: ignore[misc]
        [KEY_KNOBS[k] for k in given if k in KEY_KNOBS],
        inherited_budget=inherits_budget(policy, server),
    )
    if conflict is not None:
        raise RequestSettingsError(request_message(conflict))
    try:
        cfg = settings.apply(server)
    except ValidationError as e:
        err = e.errors()[0]  # the request's budget against the server's settings (e.g. its sinks)
        key = budget_keys[0] if budget_keys else "kv_eviction"
        raise RequestSettingsError(f"vllm_xargs.{key}: {err['msg'].removeprefix('Value error, ')}") from None
    params_key = next((k for k in given if k in KEY_KNOBS and KEY_KNOBS[k] == "params"), None)
    if params_key is not None:
        params = getattr(settings, params_key)
        expected = num_params(cfg)
        if len(params) != expected:
            raise RequestSettingsError(
                f"vllm_xargs.{params_key}: has {len(params)} values, the served scorer needs {expected}"
            )
