"""Reference runner: any eviction policy on a Hugging Face Llama, exactly as the paper runs it.

This is the ground truth the vLLM engine is compared with, so it favours being obviously
right over being fast (batch size 1, greedy decoding, eager attention math).

How it follows evo-memory (``memory_llms/llama.py``, ``memory_policy/base.py``):

* The prompt is cut at logical multiples of ``n_up``; the policy runs whenever the sequence
  length reaches a multiple of ``n_up``. A shorter tail (end of prompt, decode steps) is
  *buffered*: each forward's attention rows are kept (right-padded with zeros for keys cached
  later, which is what the causal mask says) and scored together at the next boundary, so a
  step always sees exactly ``n_up`` queries. Tokens generated after the last boundary are
  never scored (evo-memory's ``buffer_cache``).
* Every KV head keeps its own tokens, but all heads of a layer drop the same count
  (:func:`~vllm_namm.policies.base.equalize_head_drops`, evo ``BinarySelection``); layers
  shrink independently. Evicted keys/values are physically gathered out of the HF cache.
* Budget policies, and NAMM ranked under a budget, under ``selection="page"`` (the default, as
  in the paged engine) keep the same tokens in every layer and head: whole pages of
  ``page_size`` logical positions, chosen by :func:`vllm_namm.page_plan.select_pages` exactly as
  the engine chooses them (16 is the common GPU block size; the CPU build of vLLM uses 32).
  ``selection="token"`` is the per-head rule above; so is NAMM's threshold rule (the paper's).
* RoPE positions stay logical: ``position_ids`` are passed explicitly and the causal mask is
  built from each head's cached *positions*, not from cache indices, by a registered
  attention function that reproduces HF's eager attention bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vllm_namm.config import EvictionConfig
from vllm_namm.features import gqa_average
from vllm_namm.page_plan import PagesByBudget, select_pages
from vllm_namm.policies.base import EvictionPolicy, LayerView, equalize_head_drops, protect, protected_mask

ATTN_IMPL = "namm_reference"


@dataclass
class ReferenceStep:
    """One eviction step: sequence length at the step and per-layer cache sizes."""

    seq_len: int
    before: list[int]
    after: list[int]


@dataclass
class ReferenceOutput:
    tokens: list[int]
    """Generated tokens (prompt excluded), greedy, stopping after EOS like ``generate``."""
    cache_lengths: list[int]
    """Per-layer tokens cached per KV head at the end."""
    prompt_cache_lengths: list[int]
    """Per-layer tokens cached right after the prompt (after its last eviction step)."""
    steps: list[ReferenceStep] = field(default_factory=list)
    cache_positions: list[Tensor] = field(default_factory=list)
    """Per layer: logical positions [kv_heads, n] of the tokens cached at the end."""

    @property
    def evicted(self) -> int:
        """(layer, head-slot) evictions over the whole run (per KV head)."""
        return sum(sum(b) - sum(a) for s in self.steps for b, a in [(s.before, s.after)])


class _Run:
    """Per-generation bookkeeping the attention function reads (``module._namm_run`` on the model's
    attention modules while :func:`generate` runs)."""

    def __init__(self, num_layers: int, capture: bool) -> None:
        self.key_positions: list[Tensor | None] = [None] * num_layers
        self.query_positions: Tensor | None = None
        self.capture = capture
        self.rows: list[list[Tensor]] = [[] for _ in range(num_layers)]


def _attention(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Any,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """HF ``eager_attention_forward`` with the causal mask taken from logical positions."""
    run: _Run = module._namm_run
    layer = module.layer_idx
    qpos = run.query_positions
    assert qpos is not None
    _, kv_heads, n_k, _ = key.shape
    kpos = run.key_positions[layer]
    new = qpos.view(1, -1).expand(kv_heads, -1)
    kpos = new if kpos is None else torch.cat([kpos, new], dim=1)
    if kpos.shape[1] != n_k:
        raise RuntimeError(f"layer {layer}: {kpos.shape[1]} tracked positions for {n_k} cached keys")
    run.key_positions[layer] = kpos
    groups = query.shape[1] // kv_heads
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, k.transpose(2, 3)) * scaling
    visible = kpos.repeat_interleave(groups, dim=0).unsqueeze(1) <= qpos.view(1, -1, 1)  # [h, q, k]
    mask = torch.zeros(visible.shape, dtype=weights.dtype, device=weights.device)
    mask = mask.masked_fill(~visible, torch.finfo(weights.dtype).min)
    weights = weights + mask.unsqueeze(0)
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if run.capture:
        run.rows[layer].append(gqa_average(weights[0].float(), kv_heads))
    out = torch.matmul(weights, v).transpose(1, 2).contiguous()
    return out, weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPL, _attention)
    AttentionMaskInterface.register(ATTN_IMPL, lambda *args, **kwargs: None)


def _gather_heads(x: Tensor, idx: Tensor) -> Tensor:
    """x [1, kv, n, d] -> [1, kv, m, d] with per-head token indices idx [kv, m]."""
    return torch.gather(x, 2, idx.unsqueeze(0).unsqueeze(-1).expand(1, -1, -1, x.shape[-1]))


def _pad_rows(rows: list[Tensor], n_k: int) -> Tensor:
    """Concatenate buffered [kv, q_i, k_i] attention rows into [kv, sum q_i, n_k] (zeros right)."""
    return torch.cat([torch.nn.functional.pad(r, (0, n_k - r.shape[-1])) for r in rows], dim=1)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any | None,
    prompt_ids: Sequence[int] | Tensor | str,
    policy: EvictionPolicy,
    max_new_tokens: int,
    config: EvictionConfig | None = None,
    states: list[Any] | None = None,
    page_size: int = 16,
) -> ReferenceOutput:
    """Greedy generation with ``policy`` evicting every ``config.interval`` tokens.

    ``model``: a transformers Llama-style causal LM (any attention implementation; the run
    uses its own eager one). ``states`` optionally supplies per-layer policy states (e.g.
    NAMM states carrying a candidate parameter vector). ``page_size``: the page of
    page-level selection (budget policies with ``config.selection == "page"``).
    """
    from transformers import DynamicCache

    config = config or EvictionConfig()
    if isinstance(prompt_ids, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer")
        prompt_ids = tokenizer(prompt_ids)["input_ids"]
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).flatten()
    if ids.numel() == 0:
        raise ValueError("empty prompt")
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    eos = _eos_ids(model, tokenizer)
    n_up = config.interval
    n_layers = model.config.num_hidden_layers
    _register()
    run = _Run(n_layers, capture=policy.needs_attention)
    states = states if states is not None else [policy.new_state() for _ in range(n_layers)]
    cache = DynamicCache(config=model.config)
    out = ReferenceOutput(tokens=[], cache_lengths=[], prompt_cache_lengths=[])
    buffered_q: list[Tensor] = []

    saved_impl = model.config._attn_implementation
    model.config._attn_implementation = ATTN_IMPL
    attention_modules = [m for m in model.modules() if hasattr(m, "layer_idx")]
    for m in attention_modules:
        m._namm_run = run
    try:

        def forward(chunk: Tensor, start: int) -> Tensor:
            pos = torch.arange(start, start + chunk.numel(), device=device)
            run.query_positions = pos
            buffered_q.append(pos)
            logits = model(
                input_ids=chunk.view(1, -1),
                position_ids=pos.view(1, -1),
                cache_position=pos,
                past_key_values=cache,
                use_cache=True,
            ).logits
            if (start + chunk.numel()) % n_up == 0:
                qpos = torch.cat(buffered_q)
                buffered_q.clear()
                out.steps.append(_evict(cache, run, states, policy, config, qpos, page_size))
            return logits[0, -1]

        pos = 0
        total = ids.numel()
        while pos < total:
            end = min(total, (pos // n_up + 1) * n_up)
            logits = forward(ids[pos:end], pos)
            pos = end
        out.prompt_cache_lengths = [layer.keys.shape[-2] for layer in cache.layers]
        for i in range(max_new_tokens):
            nxt = int(torch.argmax(logits).item())
            out.tokens.append(nxt)
            if nxt in eos or i == max_new_tokens - 1:
                break
            logits = forward(torch.tensor([nxt], device=device), pos)
            pos += 1
    finally:
        for m in attention_modules:
            del m._namm_run
        model.config._attn_implementation = saved_impl
    out.cache_lengths = [layer.keys.shape[-2] for layer in cache.layers]
    out.cache_positions = [p.clone() for p in run.key_positions if p is not None]
    return out


def _eos_ids(model: Any, tokenizer: Any | None) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _view(layer_idx: int, layer: Any, run: _Run, policy: EvictionPolicy, qpos: Tensor) -> LayerView:
    """What the policy sees of one layer at this step (consumes the buffered attention rows)."""
    kpos = run.key_positions[layer_idx]
    assert kpos is not None
    attn = _pad_rows(run.rows[layer_idx], kpos.shape[1]) if run.capture else None
    run.rows[layer_idx] = []
    return LayerView(
        attn=attn,
        keys=layer.keys[0] if policy.needs_keys else None,
        positions=kpos,
        query_positions=qpos,
        num_new_tokens=qpos.numel(),
    )


def _evict_pages(
    cache: Any,
    run: _Run,
    states: list[Any],
    policy: EvictionPolicy,
    config: EvictionConfig,
    qpos: Tensor,
    page_size: int,
) -> ReferenceStep:
    """Page-level selection: every layer's scores, one set of whole pages kept by all layers and
    heads (:func:`~vllm_namm.page_plan.select_pages`, the paged engine's rule), gathered."""
    views = [_view(i, layer, run, policy, qpos) for i, layer in enumerate(cache.layers)]
    scores = [policy.score(view, states[i]) for i, view in enumerate(views)]
    positions = views[0].positions[0]
    for view in views:
        if not bool((view.positions == positions).all()):
            raise RuntimeError("page-level selection needs one token set for every layer and head")
    n = positions.numel()
    assert policy.budget is not None
    plan = select_pages(
        PagesByBudget(
            scores,
            positions,
            page_size,
            keep_tokens=policy.budget.size(n, int(positions.max()) + 1),
            aggregate=policy.page_score or config.page_score,
            protected_token_mask=protected_mask(views[0], config.protect).any(dim=0),
        )
    )
    keep = plan.token_keep.to(positions.device)
    idx = torch.nonzero(keep)[:, 0]
    for i, layer in enumerate(cache.layers):
        states[i].filter(keep)
        if not bool(keep.all()):
            heads = idx.view(1, -1).expand(layer.keys.shape[1], -1)
            layer.keys = _gather_heads(layer.keys, heads)
            layer.values = _gather_heads(layer.values, heads)
            run.key_positions[i] = torch.gather(views[i].positions, 1, heads)
    after = [layer.keys.shape[-2] for layer in cache.layers]
    return ReferenceStep(seq_len=int(qpos[-1].item()) + 1, before=[n] * len(views), after=after)


def _evict(
    cache: Any,
    run: _Run,
    states: list[Any],
    policy: EvictionPolicy,
    config: EvictionConfig,
    qpos: Tensor,
    page_size: int = 16,
) -> ReferenceStep:
    """One eviction step on every layer: score, select, protect, equalise heads, gather."""
    if config.selection == "page" and policy.budget is not None:
        # budget policies and NAMM ranked under a budget, as the engine selects them
        return _evict_pages(cache, run, states, policy, config, qpos, page_size)
    before, after = [], []
    for layer_idx, layer in enumerate(cache.layers):
        view = _view(layer_idx, layer, run, policy, qpos)
        kpos = view.positions
        before.append(kpos.shape[1])
        scores = policy.score(view, states[layer_idx])
        keep = protect(policy.select(scores, view), view, config.protect)
        keep = equalize_head_drops(keep, scores)
        states[layer_idx].filter(keep)
        if not bool(keep.all()):
            idx = torch.nonzero(keep)[:, 1].view(keep.shape[0], -1)
            layer.keys = _gather_heads(layer.keys, idx)
            layer.values = _gather_heads(layer.values, idx)
            run.key_positions[layer_idx] = torch.gather(kpos, 1, idx)
        after.append(layer.keys.shape[-2])
    return ReferenceStep(seq_len=int(qpos[-1].item()) + 1, before=before, after=after)
