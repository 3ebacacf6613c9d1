"""The settings every layer shares: features, protection, budgets, and how a policy declares a knob.

This is the bottom of the stack: policies, weights files and the engine read these models, and
:mod:`vllm_namm.config` builds the full :class:`~vllm_namm.config.EvictionConfig` on top of them
and of the policies' own settings. Nothing here imports another part of the package.

Every model is ``extra="forbid"`` so a typo in a flag, a request's ``vllm_xargs`` or a
weights file's metadata is an error rather than a silently ignored value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

PageRule = Literal["all", "majority", "any"]
Selection = Literal["page", "token"]
PageScore = Literal["max", "mean", "vote"]
Kernels = Literal["auto", "triton", "torch", "reference"]
Granularity = Literal["shared", "layer"]
LayerBudget = Literal["uniform", "pyramid"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureConfig(Strict):
    """NAMM's token features (paper Table 9; evo-memory ``attn_spec_norm`` + ``namm_bam_i1``).

    The EMA coefficient is given per query step, as in evo-memory's
    ``embedding_ema_coeff``; the per-frame discount is ``gamma = coeff ** s_w``.
    """

    n_up: int = Field(512, gt=0, description="queries between two NAMM executions")
    n_w: int = Field(32, gt=0, description="STFT (Hann) window")
    s_w: int = Field(16, gt=0, description="STFT hop")
    ema_coeff_per_step: float = Field(0.99, gt=0.0, lt=1.0, allow_inf_nan=False)
    pos_dims: int = Field(8, ge=0, description="sinusoidal oldness embedding size (even)")
    pos_max_freq: float = Field(50000.0, gt=1.0)
    start_oldness_from: int = Field(
        0,
        ge=0,
        description="oldness of the newest token: 0 as evo-memory's stage configs ran (base_bam.yaml "
        "start_recency_from: 0 overrides the legacy 1 of attn_spec_norm.yaml); recorded in weights files",
    )
    key_norm: bool = Field(
        False,
        description="append the cached key's L2 norm (normalised like the bins) to the scorer input; "
        "ours, not the paper's: on our model the norm marks the fact pages the spectrogram misses",
    )

    @model_validator(mode="after")
    def _check(self) -> FeatureConfig:
        if self.n_w % 2:
            raise ValueError(f"n_w must be even (one-sided STFT), got {self.n_w}")
        if self.s_w > self.n_w:
            raise ValueError(f"s_w ({self.s_w}) must not exceed n_w ({self.n_w})")
        if self.n_up % self.s_w:
            raise ValueError(f"n_up ({self.n_up}) must be a multiple of s_w ({self.s_w})")
        if self.pos_dims % 2:
            raise ValueError(f"pos_dims must be even (sin/cos pairs), got {self.pos_dims}")
        return self

    @property
    def bins(self) -> int:
        """One-sided STFT bins: 17 for n_w = 32."""
        return self.n_w // 2 + 1

    @property
    def pad(self) -> int:
        """Attention values carried from one chunk to the next (n_w - s_w = 16)."""
        return self.n_w - self.s_w

    @property
    def gamma(self) -> float:
        """EMA discount per STFT frame (0.99 ** 16)."""
        return self.ema_coeff_per_step**self.s_w

    @property
    def normalised_dims(self) -> int:
        """Features normalised with the weights' statistics: the bins (+ the key norm)."""
        return self.bins + int(self.key_norm)

    @property
    def input_dim(self) -> int:
        """Scorer input size: oldness embedding + spectrogram bins (+ key norm): 8 + 17 = 25."""
        return self.pos_dims + self.normalised_dims


class ProtectConfig(Strict):
    """Tokens no policy may evict.

    Defaults are the paper's rule (evo-memory ``BinarySelection``: only the newest token is
    forced in). Attention-sink protection is off by default at token level because the paged
    engine always keeps the first page anyway (see :mod:`vllm_namm.page_plan`); set
    ``sink_tokens`` (e.g. 4, StreamingLLM) to get it in the reference runner too.
    """

    sink_tokens: int = Field(0, ge=0, description="oldest cached tokens always kept")
    recent_tokens: int = Field(1, ge=1, description="newest cached tokens always kept (>= 1)")
    new_tokens: bool = Field(
        False, description="also keep every token cached since the previous eviction step"
    )


class BudgetConfig(Strict):
    """Cache size of a policy that ranks: the fixed-budget baselines, and NAMM under a budget.

    Exactly one of ``tokens`` (absolute) or ``ratio`` (fraction of the request's context so
    far) must be given. Under page-level selection (the default) the budget is met in whole
    pages shared by every layer and KV head: ceil(budget / block size) pages, protected pages
    included; under token-level selection it is a per-(layer, KV head) token count. Settings of
    one policy (SnapKV's window, StreamingLLM's sinks) belong to that policy, not here.
    """

    tokens: int | None = Field(None, gt=0)
    ratio: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check(self) -> BudgetConfig:
        if (self.tokens is None) == (self.ratio is None):
            raise ValueError("budget: give exactly one of 'tokens' or 'ratio'")
        return self

    def size(self, n_tokens: int, context_tokens: int | None = None, scale: float = 1.0) -> int:
        """Tokens to keep out of the ``n_tokens`` cached (never more than there are).

        ``ratio`` is a fraction of the *context so far* (``context_tokens``: every token the
        request has seen, evicted ones included), not of what is still cached: applied to the
        cache at every step it would compound (25 % of 25 % of ...). ``scale``: this layer's
        share of the budget relative to the mean layer (per-layer pages, e.g. a pyramid), applied
        before the cap, so a layer above the mean can keep more than the plain budget.
        """
        if self.tokens is not None:
            wanted = self.tokens if scale == 1.0 else math.ceil(scale * self.tokens)
            return min(max(1, wanted), n_tokens)
        assert self.ratio is not None
        context = n_tokens if context_tokens is None else max(context_tokens, n_tokens)
        return min(n_tokens, max(1, math.ceil(scale * self.ratio * context)))


@dataclass(frozen=True)
class Knob:
    """How one setting of a policy reaches its users, attached to the field with ``Annotated``.

    A policy's :class:`PolicySettings` fields are its knobs. ``flag`` makes one a ``vllm serve``
    flag and ``key`` a per-request ``vllm_xargs`` key (it must start with the policy's name and
    ``_``, so a misspelt key of that policy is an error); with neither, it is set through the
    config only (``additional_config``). ``request_only`` knobs are no config field: they travel
    with one request into the policy's ``new_state`` (e.g. a candidate's parameter vector).
    ``own_rule``: the knob belongs to the policy's own rule, so it conflicts with a budget (NAMM's
    threshold). Checks on a knob's value go in the ``Annotated`` metadata too (pydantic's
    ``AfterValidator``), so they travel with it into the config and the request models.
    """

    flag: str | None = None
    key: str | None = None
    help: str | None = None
    metavar: str | None = None
    request_only: bool = False
    own_rule: bool = False


class PolicySettings(Strict):
    """Base of a policy's own settings (:attr:`vllm_namm.policies.base.EvictionPolicy.Settings`)."""


def knob_of(field: Any) -> Knob:
    """The :class:`Knob` of a settings field (a bare field is a config-only knob)."""
    return next((m for m in field.metadata if isinstance(m, Knob)), Knob())


class Invalid(ValueError):
    """A setting that cannot work, reported at ``field`` (a path of the config, e.g. ``budget``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def as_validation_error(self, model: str, value: Any) -> ValidationError:
        """The error pydantic reports for it, located at ``field`` (front ends map it to a flag or key)."""
        return ValidationError.from_exception_data(
            model,
            [
                {
                    "type": PydanticCustomError("value_error", "{message}", {"message": self.message}),
                    "loc": tuple(self.field.split(".")),
                    "input": value,
                }
            ],
        )
