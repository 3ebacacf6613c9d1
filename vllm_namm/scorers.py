"""NAMM scoring networks: BAM (backward attention memory) and a per-token MLP.

Both keep *all* their parameters in one flat vector (what CMA-ES evolves) and read their
layers as views of it, so ``forward(x, flat=...)`` can run with a per-request candidate
vector without copying, and a ``[batch, P]`` vector gives every batch row its own candidate.

Flat layout, per linear layer in order: weight ``[in, out]`` row-major, then bias ``[out]``
(evo-memory ``GeneralizedLinear.prepare_parameters`` with parallel operations), so vectors
exported from evo-memory load unchanged.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn


class ScorerConfig(BaseModel):
    """Scorer architecture. ``hidden`` defaults per kind: 32 for BAM (what evo-memory's
    stage configs ``namm_bam_i1..3`` ran; the paper's table says 16), 25 for the MLP."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["bam", "mlp"] = "bam"
    input_dim: int = Field(25, gt=0)
    hidden: int | None = Field(None, gt=0)
    bias: bool = True
    mlp_layers: int = Field(2, ge=1, description="MLP hidden layers")

    @model_validator(mode="after")
    def _default_hidden(self) -> ScorerConfig:
        if self.hidden is None:
            object.__setattr__(self, "hidden", 32 if self.kind == "bam" else self.input_dim)
        return self


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """x [..., n, in] @ w [(batch,) in, out] + b [(batch,) out]; broadcasting a batched w."""
    y = torch.matmul(x, w)
    if b is not None:
        y = y + (b.unsqueeze(-2) if b.dim() > 1 else b)
    return y


class FlatScorer(nn.Module):
    """Base: a list of linear shapes read out of one flat parameter vector."""

    def __init__(self, shapes: list[tuple[int, int]], bias: bool) -> None:
        super().__init__()
        self.shapes = shapes
        self.bias = bias
        n = sum(i * o + (o if bias else 0) for i, o in shapes)
        self.flat = nn.Parameter(torch.zeros(n), requires_grad=False)

    @property
    def num_params(self) -> int:
        return self.flat.numel()

    def to_flat(self) -> Tensor:
        return self.flat.detach().clone()

    @torch.no_grad()
    def from_flat(self, vec: Tensor) -> None:
        """Load ``vec`` in place (shape checked)."""
        vec = torch.as_tensor(vec)
        if vec.dim() != 1 or vec.numel() != self.num_params:
            raise ValueError(
                f"{type(self).__name__} expects a flat vector of {self.num_params} parameters, "
                f"got shape {tuple(vec.shape)}"
            )
        self.flat.copy_(vec.to(self.flat))

    def layers(self, flat: Tensor | None = None) -> list[tuple[Tensor, Tensor | None]]:
        """(weight [(batch,) in, out], bias) views of ``flat`` (default: own parameters)."""
        flat = self.flat if flat is None else flat
        if flat.shape[-1] != self.num_params:
            raise ValueError(f"expected {self.num_params} parameters, got {flat.shape[-1]}")
        batch = flat.shape[:-1]
        out, off = [], 0
        for i, o in self.shapes:
            w = flat[..., off : off + i * o].reshape(*batch, i, o)
            off += i * o
            b = None
            if self.bias:
                b = flat[..., off : off + o]
                off += o
            out.append((w, b))
        return out


class BAMScorer(FlatScorer):
    """Backward attention memory (evo-memory ``GeneralizedScoring`` with ``bam.yaml``).

    One single-head self-attention over the layer's cached tokens, *counter-causal*: token i
    (oldest first) attends to itself and newer tokens only, so a token's score can depend on
    what came after it but never on older tokens. No RoPE, no layer norm. Output projection
    gives 2 x input dims split into (res, mult): ``x * (1 + mult) + res``; then a linear layer
    gives the score. Parameters at hidden 32 with bias: 25*96+96 + 32*50+50 + 25+1 = 4172.
    """

    def __init__(self, input_dim: int = 25, hidden: int = 32, bias: bool = True) -> None:
        super().__init__([(input_dim, 3 * hidden), (hidden, 2 * input_dim), (input_dim, 1)], bias)
        self.input_dim = input_dim
        self.hidden = hidden

    def forward(self, x: Tensor, flat: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """x [batch, n, input_dim] -> scores [batch, n]. ``valid`` [batch, n] masks padding keys."""
        (w_qkv, b_qkv), (w_o, b_o), (w_s, b_s) = self.layers(flat)
        x = x.to(self.flat.dtype)
        q, k, v = _linear(x, w_qkv, b_qkv).chunk(3, dim=-1)
        n = x.shape[-2]
        logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hidden)  # [batch, n, n]
        older = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(diagonal=-1)  # key j < query i
        mask = older if valid is None else older | ~valid.unsqueeze(-2)
        logits = logits.masked_fill(mask, float("-inf"))
        attn = torch.softmax(logits, dim=-1).nan_to_num(nan=0.0)
        res, mult = _linear(torch.matmul(attn, v), w_o, b_o).chunk(2, dim=-1)
        x = x * (1.0 + mult) + res
        return _linear(x, w_s, b_s).squeeze(-1)


class MLPScorer(FlatScorer):
    """Per-token MLP: ``mlp_layers`` ReLU hidden layers of width ``hidden`` with residual
    connections, then a linear score (paper App. A; evo-memory ``mlp.yaml`` uses
    ``residual_first``, which needs hidden == input_dim). Deviation: evo-memory's
    ``StatelessGeneralizedMLP`` applies the non-linearity to the *input* of intermediate
    layers (``non_linearity(h)``, a bug); we apply it to the layer output.
    """

    def __init__(self, input_dim: int = 25, hidden: int = 25, layers: int = 2, bias: bool = True) -> None:
        shapes = [(input_dim, hidden)] + [(hidden, hidden)] * (layers - 1) + [(hidden, 1)]
        super().__init__(shapes, bias)
        self.input_dim = input_dim
        self.hidden = hidden

    def forward(self, x: Tensor, flat: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """x [batch, n, input_dim] -> scores [batch, n] (``valid`` unused: tokens are independent)."""
        *hidden_layers, (w_s, b_s) = self.layers(flat)
        h = x.to(self.flat.dtype)
        for i, (w, b) in enumerate(hidden_layers):
            out = torch.relu(_linear(h, w, b))
            residual = i > 0 or self.input_dim == self.hidden
            h = h + out if residual else out
        return _linear(h, w_s, b_s).squeeze(-1)


Scorer = BAMScorer | MLPScorer


def make_scorer(cfg: ScorerConfig) -> Scorer:
    """Scorer for ``cfg`` with all parameters 0 (evo-memory ``scoring_initializer: 0``)."""
    assert cfg.hidden is not None
    if cfg.kind == "bam":
        return BAMScorer(cfg.input_dim, cfg.hidden, cfg.bias)
    return MLPScorer(cfg.input_dim, cfg.hidden, cfg.mlp_layers, cfg.bias)
