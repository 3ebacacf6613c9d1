"""NAMM scoring networks: BAM (backward attention memory) and a per-token MLP.

Both keep *all* their parameters in one flat vector (what CMA-ES evolves) and read their
layers as views of it, so ``forward(x, flat=...)`` can run with a per-request candidate
vector without copying, and a ``[batch, P]`` vector gives every batch row its own candidate.

Flat layout, per linear layer in order: weight ``[in, out]`` row-major, then bias ``[out]``
(evo-memory ``GeneralizedLinear.prepare_parameters`` with parallel operations), so vectors
exported from evo-memory load unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F


class ScorerConfig(BaseModel):
    """Scorer architecture. ``hidden`` defaults per kind: 32 for BAM (what evo-memory's
    stage configs ``namm_bam_i1..3`` ran; the paper's table says 16), 25 for the MLP."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["bam", "mlp"] = "bam"
    input_dim: int = Field(25, gt=0)
    hidden: int | None = Field(None, gt=0)
    bias: bool = True
    mlp_layers: int = Field(2, ge=1, description="MLP hidden layers")
    window: int | None = Field(
        None,
        gt=0,
        description="BAM only: a token attends to itself and its `window` newer neighbours "
        "(cost linear in the cache); None = every newer token (evo-memory's BAM, cost n^2)",
    )

    @model_validator(mode="after")
    def _default_hidden(self) -> ScorerConfig:
        if self.hidden is None:
            object.__setattr__(self, "hidden", 32 if self.kind == "bam" else self.input_dim)
        if self.window is not None and self.kind != "bam":
            raise ValueError(f"window applies to the bam scorer only, not {self.kind!r}")
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

    ``window`` (ours, not evo-memory's) limits each token to itself and its ``window`` newer
    neighbours, so the cost is linear in the cache instead of quadratic.

    Rows may be *left*-padded (padding = the oldest positions) without any mask: a real token
    only looks at newer tokens, which are all real. That is how :func:`score_ragged` batches
    caches of different lengths into one call.
    """

    def __init__(
        self, input_dim: int = 25, hidden: int = 32, bias: bool = True, window: int | None = None
    ) -> None:
        super().__init__([(input_dim, 3 * hidden), (hidden, 2 * input_dim), (input_dim, 1)], bias)
        self.input_dim = input_dim
        self.hidden = hidden
        self.window = window

    def forward(self, x: Tensor, flat: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """x [batch, n, input_dim] -> scores [batch, n]. ``valid`` [batch, n] masks padding keys."""
        (w_qkv, b_qkv), (w_o, b_o), (w_s, b_s) = self.layers(flat)
        x = x.to(self.flat.dtype)
        h = self.hidden
        attended = torch.zeros(*x.shape[:-1], h, dtype=x.dtype, device=x.device)
        # Exact fast path: with a zero value projection the attention output is 0 whatever the
        # weights (the shipped hand-set weights are like that); compute only rows that need it.
        w_v = w_qkv[..., 2 * h :]
        v_used = w_v.reshape(*w_v.shape[:-2], -1).ne(0).any(dim=-1)
        if b_qkv is not None:
            v_used = v_used | b_qkv[..., 2 * h :].ne(0).any(dim=-1)
        if v_used.dim() == 0:
            if bool(v_used):
                attended = self._attend(x, w_qkv, b_qkv, valid)
        elif bool(v_used.any()):
            rows = v_used.nonzero().squeeze(-1)
            sub_b = None if b_qkv is None else b_qkv[rows]
            sub_valid = None if valid is None else valid[rows]
            attended[rows] = self._attend(x[rows], w_qkv[rows], sub_b, sub_valid)
        res, mult = _linear(attended, w_o, b_o).chunk(2, dim=-1)
        x = x * (1.0 + mult) + res
        return _linear(x, w_s, b_s).squeeze(-1)

    def forward_reference(self, x: Tensor, flat: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """The same scores written as the definition reads: an explicit [batch, n, n] attention
        matrix with the counter-causal (and window) mask. Slow (n^2 memory): for checking."""
        (w_qkv, b_qkv), (w_o, b_o), (w_s, b_s) = self.layers(flat)
        x = x.to(self.flat.dtype)
        q, k, v = _linear(x, w_qkv, b_qkv).chunk(3, dim=-1)
        n = x.shape[-2]
        i = torch.arange(n, device=x.device)
        hidden = i[None, :] < i[:, None]  # key j older than query i
        if self.window is not None:
            hidden |= i[None, :] > i[:, None] + self.window
        mask = hidden if valid is None else hidden | ~valid.unsqueeze(-2)
        logits = (torch.matmul(q, k.transpose(-1, -2)) / self.hidden**0.5).masked_fill(mask, float("-inf"))
        attn = torch.softmax(logits, dim=-1).nan_to_num(nan=0.0)
        res, mult = _linear(torch.matmul(attn, v), w_o, b_o).chunk(2, dim=-1)
        return _linear(x * (1.0 + mult) + res, w_s, b_s).squeeze(-1)

    def _attend(self, x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, valid: Tensor | None) -> Tensor:
        """Counter-causal attention output [batch, n, hidden], flash-style (no n x n tensor).

        Reversing the token order turns "attend to newer tokens" into the causal mask that
        ``scaled_dot_product_attention`` applies without materialising it.
        """
        q, k, v = _linear(x, w_qkv, b_qkv).flip(-2).chunk(3, dim=-1)
        if valid is not None:
            return bam_attention_masked(q, k, v, valid.flip(-1), self.window).flip(-2)
        if self.window is None or self.window + 1 >= x.shape[-2]:
            out = F.scaled_dot_product_attention(
                q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), is_causal=True
            )
            return out.squeeze(1).flip(-2)
        return bam_attention_windowed(q, k, v, self.window).flip(-2)


def bam_attention_masked(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, window: int | None) -> Tensor:
    """Reversed-order attention with an explicit mask (arbitrary padding): the general, slow path."""
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[None, :] >= i[:, None] - window
    allowed = allowed & valid.unsqueeze(-2)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask=allowed.unsqueeze(1)
    )
    return out.squeeze(1).nan_to_num(nan=0.0)


def bam_attention_windowed(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Causal attention in reversed order where query i sees keys [i - window, i]: O(n * window).

    Queries go in blocks of ``window``; each block attends to its own and the previous block's
    keys through one fixed ``[window, 2 * window]`` band mask.
    """
    *batch, n, hd = q.shape
    w = window
    nb = -(-n // w)
    pad = nb * w - n
    if pad:  # right padding in reversed order: only padding queries can see it
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qb = q.reshape(*batch, nb, w, hd)
    kb = F.pad(k.reshape(*batch, nb, w, hd), (0, 0, 0, 0, 1, 0))  # a zero block before the first
    vb = F.pad(v.reshape(*batch, nb, w, hd), (0, 0, 0, 0, 1, 0))
    kc = torch.cat([kb[..., :-1, :, :], kb[..., 1:, :, :]], dim=-2)  # [.., nb, 2w, hd]: previous + own block
    vc = torch.cat([vb[..., :-1, :, :], vb[..., 1:, :, :]], dim=-2)
    a = torch.arange(w, device=q.device)[:, None]
    c = torch.arange(2 * w, device=q.device)[None, :]
    band = (c >= a) & (c <= a + w)  # key (b-1)*w + c is within [query - w, query]
    mask = band.expand(nb, w, 2 * w).clone()
    mask[0, :, :w] = False  # the first block has no previous block
    out = F.scaled_dot_product_attention(qb, kc, vc, attn_mask=mask)
    return out.reshape(*batch, nb * w, hd)[..., :n, :]


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

    def forward_reference(self, x: Tensor, flat: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """Per-token already: the same as :meth:`forward`."""
        return self.forward(x, flat, valid)

    def forward(self, x: Tensor, flat: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """x [batch, n, input_dim] -> scores [batch, n] (``valid`` unused: tokens are independent)."""
        w_s, b_s = self.layers(flat)[-1]
        return _linear(self.hidden_state(x, flat), w_s, b_s).squeeze(-1)

    def hidden_state(self, x: Tensor, flat: Tensor | None = None) -> Tensor:
        """[batch, n, hidden]: what the final linear layer reads. Per token, so an offline search
        over the output layer alone (``evolve.proxy``) computes it once per token."""
        *hidden_layers, _ = self.layers(flat)
        h = x.to(self.flat.dtype)
        for i, (w, b) in enumerate(hidden_layers):
            out = torch.relu(_linear(h, w, b))
            residual = i > 0 or self.input_dim == self.hidden
            h = h + out if residual else out
        return h


Scorer = BAMScorer | MLPScorer


def make_scorer(cfg: ScorerConfig) -> Scorer:
    """Scorer for ``cfg`` with all parameters 0 (evo-memory ``scoring_initializer: 0``)."""
    assert cfg.hidden is not None
    if cfg.kind == "bam":
        return BAMScorer(cfg.input_dim, cfg.hidden, cfg.bias, cfg.window)
    return MLPScorer(cfg.input_dim, cfg.hidden, cfg.mlp_layers, cfg.bias)


def score_ragged(
    scorer: Scorer, xs: list[Tensor], flats: list[Tensor | None], max_elems: int = 1 << 26
) -> list[Tensor]:
    """Score caches of different lengths in as few scorer calls as memory allows (one, usually).

    ``xs[i]`` [rows_i, n_i, input_dim] (e.g. one layer's KV heads of one request, oldest token
    first) with its own flat parameter vector ``flats[i]`` (None = the scorer's own). Rows are
    left-padded to the longest cache, which changes no real token's score (see
    :class:`BAMScorer`), and returned unpadded as [rows_i, n_i].
    """
    if not xs:
        return []
    n_max = max(x.shape[1] for x in xs)
    per_row = n_max * max(3 * getattr(scorer, "hidden", 1), x_dim := xs[0].shape[-1])
    rows_per_call = max(1, max_elems // max(1, per_row))
    shared = all(f is None for f in flats) or all(f is flats[0] for f in flats)
    out: list[Tensor] = []
    group: list[int] = []

    def flush() -> None:
        rows = sum(xs[i].shape[0] for i in group)
        batch = xs[group[0]].new_zeros(rows, n_max, x_dim)
        flat_rows: list[Tensor] = []
        r = 0
        for i in group:
            x = xs[i]
            batch[r : r + x.shape[0], n_max - x.shape[1] :] = x
            if not shared:
                f = scorer.flat if flats[i] is None else flats[i]
                flat_rows.append(f.to(batch).expand(x.shape[0], -1))
            r += x.shape[0]
        flat = (
            (None if flats[group[0]] is None else flats[group[0]].to(batch))
            if shared
            else torch.cat(flat_rows)
        )
        scores = scorer(batch, flat)
        r = 0
        for i in group:
            x = xs[i]
            out.append(scores[r : r + x.shape[0], n_max - x.shape[1] :])
            r += x.shape[0]
        group.clear()

    rows_in_group = 0
    for i, x in enumerate(xs):
        if group and rows_in_group + x.shape[0] > rows_per_call:
            flush()
            rows_in_group = 0
        group.append(i)
        rows_in_group += x.shape[0]
    flush()
    return out
