"""Validated settings for eviction: features, protection, budgets and the policy choice.

Every model is ``extra="forbid"`` so a typo in a flag, a request's ``vllm_xargs`` or a
weights file's metadata is an error rather than a silently ignored value.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vllm_namm.policy_registry import POLICY_NAMES, budget_takers, needs_budget, takes_budget
from vllm_namm.shipped_weights import SHIPPED_WEIGHTS, resolve_weights

PolicyName = Literal[POLICY_NAMES]  # type: ignore[valid-type]  # the registry's names
PageRule = Literal["all", "majority", "any"]
Selection = Literal["page", "token"]
PageScore = Literal["max", "mean", "vote"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureConfig(_Strict):
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


class ProtectConfig(_Strict):
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


class BudgetConfig(_Strict):
    """Cache size of the fixed-budget baselines.

    Exactly one of ``tokens`` (absolute) or ``ratio`` (fraction of the request's context so
    far) must be given. Under page-level selection (the default) the budget is met in whole
    pages shared by every layer and KV head: ceil(budget / block size) pages, protected pages
    included; under token-level selection it is a per-(layer, KV head) token count.
    """

    tokens: int | None = Field(None, gt=0)
    ratio: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    streaming_sinks: int = Field(4, ge=0, description="StreamingLLM attention-sink tokens")
    snapkv_window: int = Field(32, gt=0, description="SnapKV observation window (latest queries)")
    snapkv_kernel: int = Field(7, gt=0, description="SnapKV max-pool kernel (odd)")

    @model_validator(mode="after")
    def _check(self) -> BudgetConfig:
        if (self.tokens is None) == (self.ratio is None):
            raise ValueError("budget: give exactly one of 'tokens' or 'ratio'")
        if self.snapkv_kernel % 2 == 0:
            raise ValueError(f"snapkv_kernel must be odd, got {self.snapkv_kernel}")
        if self.tokens is not None and self.tokens <= self.streaming_sinks:
            raise ValueError(
                f"budget tokens ({self.tokens}) must exceed streaming_sinks ({self.streaming_sinks})"
            )
        return self

    def size(self, n_tokens: int, context_tokens: int | None = None) -> int:
        """Tokens to keep out of the ``n_tokens`` cached (never more than there are).

        ``ratio`` is a fraction of the *context so far* (``context_tokens``: every token the
        request has seen, evicted ones included), not of what is still cached: applied to the
        cache at every step it would compound (25 % of 25 % of ...).
        """
        if self.tokens is not None:
            return min(self.tokens, n_tokens)
        assert self.ratio is not None
        context = n_tokens if context_tokens is None else max(context_tokens, n_tokens)
        return min(n_tokens, max(1, math.ceil(self.ratio * context)))


class EvictionConfig(_Strict):
    """Which policy runs, how often, and how its token decisions are applied."""

    policy: PolicyName = "none"
    interval: int = Field(512, gt=0, description="n_up: tokens between two eviction steps")
    budget: BudgetConfig | None = None
    protect: ProtectConfig = ProtectConfig()
    weights: Path | None = Field(
        None, description=f"NAMM weights file or shipped name ({', '.join(SHIPPED_WEIGHTS)}); None = evolved"
    )
    threshold: float | None = Field(
        None,
        allow_inf_nan=False,
        description="NAMM keep threshold (keep score >= threshold); None = the weights file's "
        "(NaN would evict every unprotected token: score >= nan is always false)",
    )
    page_rule: PageRule = Field(
        "all",
        description="token-level selection (and namm): free a page when all / most / any of its "
        "(layer, head, token) entries are evicted",
    )
    selection: Selection = Field(
        "page",
        description="budget policies: 'page' keeps the best whole pages within the budget "
        "(page_plan.select_pages); 'token' keeps each head's best tokens, then frees pages by page_rule",
    )
    page_score: PageScore = Field(
        "max",
        description="page-level selection: a page's score from its tokens' per-head normalised "
        "ranks over every layer and KV head (max, mean, or the share the token-level budget would keep); "
        "max measured best (README, Measured results)",
    )
    kernels: Literal["auto", "triton", "torch", "reference"] = Field(
        "auto",
        description="feature/scorer kernels of the eviction step: auto = Triton on GPU, exact fast torch on "
        "CPU; reference = the slow plain-torch definitions (for checking the fast paths)",
    )
    lag: int = Field(
        2,
        ge=0,
        le=64,
        description="engine steps between a step's start and its freed pages: the decision is computed "
        "off the critical path meanwhile (0 = synchronous, inside the engine step)",
    )

    @field_validator("weights", mode="before")
    @classmethod
    def _shipped_name(cls, v: object) -> object:
        return resolve_weights(v) if isinstance(v, (str, Path)) else v

    @field_validator("interval")
    @classmethod
    def _whole_hops(cls, v: int) -> int:
        if v % 16:
            raise ValueError("must be a multiple of 16 (the STFT hop)")
        return v

    @model_validator(mode="after")
    def _check(self) -> EvictionConfig:
        if needs_budget(self.policy) and self.budget is None:
            raise ValueError(f"policy '{self.policy}' needs a budget (budget.tokens or budget.ratio)")
        if not takes_budget(self.policy) and self.budget is not None:
            raise ValueError(f"policy '{self.policy}' takes no budget (only {budget_takers()})")
        if self.policy != "namm" and (self.weights is not None or self.threshold is not None):
            raise ValueError(f"weights/threshold only apply to policy 'namm', not '{self.policy}'")
        if self.threshold is not None and self.budget is not None:
            raise ValueError("namm under a budget keeps its best-scored tokens: a threshold does not apply")
        return self
