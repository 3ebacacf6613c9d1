"""Per-request eviction settings carried in ``vllm_xargs`` (``SamplingParams.extra_args``).

Keys we own: ``kv_eviction``, ``kv_eviction_budget``, ``kv_eviction_ratio``,
``namm_params``, ``namm_threshold`` and ``namm_ema_coeff_per_step`` (the EMA coefficient per
query step, so that evolution can search gamma, the paper's App. D fix for needle retrieval). Any other key starting with ``kv_eviction`` or
``namm_`` is rejected, so that a typo is a 400 rather than silently ignored; keys of other
plugins pass through untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vllm_namm.config import BudgetConfig, EvictionConfig, PolicyName
from vllm_namm.policy_registry import budget_takers, needs_budget, takes_budget

OUR_PREFIXES = ("kv_eviction", "namm_")


class RequestSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kv_eviction: PolicyName | None = None
    kv_eviction_budget: int | None = Field(None, gt=0)
    kv_eviction_ratio: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    namm_params: tuple[float, ...] | None = None
    namm_threshold: float | None = Field(None, allow_inf_nan=False)
    namm_ema_coeff_per_step: float | None = Field(None, gt=0.0, lt=1.0, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools(cls, v: Any) -> Any:
        """``True`` is no budget, ratio or policy (pydantic would read it as 1)."""
        if isinstance(v, bool) or (isinstance(v, (list, tuple)) and any(isinstance(x, bool) for x in v)):
            raise ValueError("must not be a boolean")
        return v

    @field_validator("namm_params")
    @classmethod
    def _finite(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and not all(math.isfinite(x) for x in v):
            raise ValueError("namm_params contains NaN or inf")
        return v

    @property
    def is_default(self) -> bool:
        return all(getattr(self, name) is None for name in type(self).model_fields)

    def cache_key(self) -> str:
        """Identity of the policy these settings build (params excluded: they live in the state)."""
        data = self.model_dump(exclude={"namm_params"})
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def apply(self, server: EvictionConfig) -> EvictionConfig:
        """The server's config with this request's overrides (validated again as a whole)."""
        data = server.model_dump()
        policy = self.kv_eviction or server.policy
        data["policy"] = policy
        if self.kv_eviction_budget is not None or self.kv_eviction_ratio is not None:
            extra = (server.budget.model_dump() if server.budget else {}) | {
                "tokens": self.kv_eviction_budget,
                "ratio": self.kv_eviction_ratio,
            }
            data["budget"] = BudgetConfig(**extra).model_dump()
        own_budget = self.kv_eviction_budget is not None or self.kv_eviction_ratio is not None
        if not takes_budget(policy) or (
            not needs_budget(policy) and policy != server.policy and not own_budget
        ):
            data["budget"] = None  # namm asked for on a baseline's server keeps its threshold rule
        if policy != "namm":
            data["weights"] = None
            data["threshold"] = None
        elif self.namm_threshold is not None:
            data["threshold"] = self.namm_threshold
        return EvictionConfig(**data)


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


def validate_for_server(
    settings: RequestSettings, server: EvictionConfig, num_params: Callable[[EvictionConfig], int]
) -> None:
    """Check the request's settings make sense on this server; raises RequestSettingsError.

    ``num_params(cfg)`` gives the scorer size of the NAMM policy ``cfg`` builds. A key that
    would be silently ignored (a budget for namm, a threshold for streaming) is an error too.
    """
    if settings.is_default:
        return
    if server.policy == "none" and settings.kv_eviction not in (None, "none"):
        raise RequestSettingsError(
            "vllm_xargs.kv_eviction: this server runs with --kv-eviction none; start it with a policy "
            "to evict per request"
        )
    policy = settings.kv_eviction or server.policy
    given = [
        k for k in type(settings).model_fields if k != "kv_eviction" and getattr(settings, k) is not None
    ]
    budget_keys = [k for k in ("kv_eviction_budget", "kv_eviction_ratio") if k in given]
    if len(budget_keys) == 2:
        raise RequestSettingsError("vllm_xargs: give exactly one of kv_eviction_budget or kv_eviction_ratio")
    if budget_keys and not takes_budget(policy):
        raise RequestSettingsError(
            f"vllm_xargs.{budget_keys[0]}: only applies to kv_eviction {'/'.join(budget_takers())}, "
            f"this request runs {policy}"
        )
    if "namm_threshold" in given and (budget_keys or (server.budget is not None and policy == server.policy)):
        raise RequestSettingsError(
            "vllm_xargs.namm_threshold: namm ranked under a budget keeps its best-scored "
            "tokens; a threshold does not apply"
        )
    for key in ("namm_params", "namm_threshold", "namm_ema_coeff_per_step"):
        if key in given and policy != "namm":
            raise RequestSettingsError(
                f"vllm_xargs.{key}: only valid with kv_eviction=namm, this request runs {policy}"
            )
    if needs_budget(policy) and not budget_keys and server.budget is None:
        raise RequestSettingsError(
            f"vllm_xargs.kv_eviction: {policy} needs kv_eviction_budget or kv_eviction_ratio "
            "(this server has no budget)"
        )
    try:
        cfg = settings.apply(server)
    except ValidationError as e:
        err = e.errors()[0]  # the request's budget against the server's settings (e.g. its sinks)
        key = budget_keys[0] if budget_keys else "kv_eviction"
        raise RequestSettingsError(f"vllm_xargs.{key}: {err['msg'].removeprefix('Value error, ')}") from None
    if settings.namm_params is not None:
        expected = num_params(cfg)
        if len(settings.namm_params) != expected:
            raise RequestSettingsError(
                f"vllm_xargs.namm_params: has {len(settings.namm_params)} values, the served scorer "
                f"needs {expected}"
            )
