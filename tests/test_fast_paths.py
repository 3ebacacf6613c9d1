"""Every fast path of an eviction step equals the slow definition it replaces (to 1e-5).

The definitions: attention columns as an explicit softmax with ``repeat_interleave`` GQA
(``attention_columns_paged_ref``), STFT + EMA as ``torch.fft.rfft`` over unfolded frames
(``spectrogram_ema_ref``), BAM as an explicit n x n masked attention (``forward_reference``).
The fast paths: query-blocked columns with GQA by reshape and suffix-only masking, the DFT-basis
matmul STFT on the ``[kv, n_q, n]`` layout, the Triton kernels (interpreter on CPU), BAM through
``scaled_dot_product_attention`` on reversed tokens, the zero-value-projection skip, the windowed
BAM, ragged batching of many caches into one scorer call, and whole engine steps.
"""

from __future__ import annotations

from triton_interpreter import CUDA  # first: sets TRITON_INTERPRET when there is no CUDA

# isort: split

import namm_kernels as nk
import pytest
import torch

from vllm_namm.config import EvictionConfig
from vllm_namm.policies import HAND_WEIGHTS, make_policy
from vllm_namm.request_memory import KeysReader, PagedCacheReader, RequestMemory, begin_step, compute_steps
from vllm_namm.scorers import BAMScorer, MLPScorer, ScorerConfig, score_ragged
from vllm_namm.weights import NammWeights, load_weights, save_weights

DEVICE = "cuda" if CUDA else "cpu"
GAMMA = 0.99**16
TOL = dict(rtol=1e-5, atol=1e-5)


def request(hq=4, hkv=2, d=64, bs=16, n_q=48, n_live=90, seed=0, newest=True):
    """A paged request with holes (positions with gaps); queries are the newest tokens, or not."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = -(-n_live // bs)
    pool = 2 * n_blocks + 1
    kv = torch.randn(pool, hkv, bs, 2 * d, generator=g).to(DEVICE)
    bt = torch.randperm(pool, generator=g)[:n_blocks].to(torch.int32).to(DEVICE)
    pos = torch.sort(torch.randperm(3 * n_live, generator=g)[:n_live]).values.to(DEVICE)
    qpos = pos[-n_q:].clone() if newest else torch.sort(pos[torch.randperm(n_live, generator=g)[:n_q]]).values
    q = torch.randn(n_q, hq, d, generator=g).to(DEVICE)
    return dict(
        q=q,
        key_cache=kv,
        layout=nk.PagedKeyLayout.flash(kv),
        block_table=bt,
        positions=pos,
        query_positions=qpos,
        scale=d**-0.5,
    )


# ----------------------------------------------------------------------------- attention columns

SHAPES = [
    (4, 2, 64, 16, 48, 90, True),
    (8, 2, 32, 32, 64, 300, False),
    (4, 4, 16, 16, 16, 40, True),
    (6, 3, 32, 16, 32, 130, False),
]


@pytest.mark.parametrize("hq,hkv,d,bs,n_q,n_live,newest", SHAPES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_columns_fast_equals_reference(backend, hq, hkv, d, bs, n_q, n_live, newest):
    req = request(hq, hkv, d, bs, n_q, n_live, seed=n_live, newest=newest)
    want = nk.attention_columns_paged(**req, backend="reference")
    torch.testing.assert_close(nk.attention_columns_paged(**req, backend=backend), want, **TOL)


@pytest.mark.parametrize("hq,hkv,d,bs,n_q,n_live,newest", SHAPES)
def test_attention_column_sums_equal_the_reference_columns_summed(hq, hkv, d, bs, n_q, n_live, newest):
    """H2O's sums over the queries, computed without the [kv, n_q, n] matrix (CPU)."""
    req = request(hq, hkv, d, bs, n_q, n_live, seed=n_live, newest=newest)
    want = nk.attention_columns_paged(
        **{**req, "key_cache": req["key_cache"].cpu()}, backend="reference"
    ).sum(1)
    keys = nk.gather_keys(req["key_cache"], req["layout"], req["block_table"])[:n_live].cpu()
    args = (req["q"].cpu(), keys, req["positions"].cpu(), req["query_positions"].cpu(), req["scale"])
    for block in (1, 100, 1 << 30):
        torch.testing.assert_close(
            nk.attention_column_sums_dense(*args, max_block_elems=block), want.cpu(), **TOL
        )


def test_attention_columns_of_a_query_that_sees_no_key_are_zero():
    """The definition's nan_to_num(0) for a query older than every key (softmax over nothing)."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(4, 4, 16, generator=g), torch.randn(6, 2, 16, generator=g)
    pos, qpos = torch.arange(10, 16), torch.tensor([3, 9, 10, 12])
    got = nk.attention_columns_dense(q, k, pos, qpos, 0.25)
    assert torch.equal(got[:, :2], torch.zeros(2, 2, 6)) and torch.isfinite(got).all()
    torch.testing.assert_close(got[:, 2:].sum(-1), torch.ones(2, 2))


def test_attention_columns_blocks_do_not_matter():
    req = request(8, 2, 32, 16, 64, 200, seed=3, newest=False)
    keys = nk.gather_keys(req["key_cache"], req["layout"], req["block_table"])[:200]
    args = (req["q"], keys, req["positions"], req["query_positions"], req["scale"])
    whole = nk.attention_columns_dense(*args, max_block_elems=1 << 30)
    torch.testing.assert_close(nk.attention_columns_dense(*args, max_block_elems=1), whole, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- STFT + EMA


@pytest.mark.parametrize(
    "n_fft,hop,n_q,n,per_head",
    [(32, 16, 48, 37, False), (32, 16, 64, 300, True), (64, 16, 64, 20, False), (16, 8, 24, 9, True)],
)
def test_matmul_stft_equals_reference(n_fft, hop, n_q, n, per_head):
    g = torch.Generator().manual_seed(n)
    hkv = 2
    cols = torch.rand(hkv, n_q, n, generator=g)
    pad = torch.rand(hkv, n, n_fft - hop, generator=g)
    state = torch.rand(hkv, n, n_fft // 2 + 1, generator=g)
    shape = (hkv, n) if per_head else (n,)
    first = torch.randint(0, n_q // hop + 1, shape, generator=g)
    want = nk.spectrogram_ema_ref(cols, pad, state, first, GAMMA, n_fft, hop)
    for block in (1, 7, 4096):
        got = nk.spectrogram_ema_torch(cols, pad, state, first, GAMMA, n_fft, hop, block_tokens=block)
        torch.testing.assert_close(got[0], want[0], **TOL)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_matmul_stft_without_history_equals_reference():
    """The first step (no pad, no state, every token present from frame 0): the EMA is a
    matrix-vector product over frames."""
    g = torch.Generator().manual_seed(11)
    cols = torch.rand(3, 64, 150, generator=g)
    want = nk.spectrogram_ema_ref(cols, gamma=GAMMA)
    for block in (1, 64, 4096):
        got = nk.spectrogram_ema_torch(cols, gamma=GAMMA, block_tokens=block)
        torch.testing.assert_close(got[0], want[0], **TOL)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_spectrogram_backends_equal_reference(backend):
    g = torch.Generator().manual_seed(1)
    hkv, n_q, n = 2, 48, 37
    cols = torch.rand(hkv, n_q, n, generator=g).to(DEVICE)
    pad = torch.rand(hkv, n, 16, generator=g).to(DEVICE)
    state = torch.rand(hkv, n, 17, generator=g).to(DEVICE)
    first = torch.randint(0, 3, (n,), generator=g).to(DEVICE)
    got = nk.spectrogram_ema(cols, pad, state, first, GAMMA, backend=backend)
    want = nk.spectrogram_ema_ref(cols, pad, state, first, GAMMA)
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_triton_stft_refuses_other_windows():
    with pytest.raises(ValueError, match="n_w=32, s_w=16 only"):
        nk.spectrogram_ema(torch.rand(1, 64, 5), gamma=GAMMA, backend="triton", n_fft=64, hop=16)


def test_fused_triton_stft_refuses_other_windows():
    req = request(hq=8, hkv=2, d=128, bs=32, n_q=32, n_live=75, seed=4)
    with pytest.raises(ValueError, match="n_w=32, s_w=16 only"):
        nk.paged_spectrogram_ema(**req, gamma=GAMMA, backend="triton", n_fft=64, hop=32)


def test_paged_pipeline_takes_the_window_and_hop():
    """The torch side of the paged pipeline follows ``n_fft``/``hop`` (FeatureConfig's n_w/s_w)."""
    req = request(hq=8, hkv=2, d=128, bs=32, n_q=64, n_live=75, seed=4)
    n = req["positions"].numel()
    args = dict(prev_pad=torch.zeros(2, n, 32, device=DEVICE), gamma=GAMMA, n_fft=64, hop=32)
    got = nk.paged_spectrogram_ema(**req, **args, backend="torch")
    want = nk.paged_spectrogram_ema(**req, **args, backend="reference")
    assert got[0].shape == (2, n, 33) and got[1].shape == (2, n, 32)
    torch.testing.assert_close(got[0], want[0], **TOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_pipeline_equals_reference(backend):
    req = request(hq=8, hkv=2, d=128, bs=32, n_q=32, n_live=75, seed=4)
    g = torch.Generator().manual_seed(5)
    n = req["positions"].numel()
    pad = (0.05 * torch.rand(2, n, 16, generator=g)).to(DEVICE)
    state = torch.rand(2, n, 17, generator=g).to(DEVICE)
    first = nk.first_valid_frame(req["positions"], req["query_positions"])
    args = dict(prev_pad=pad, prev_state=state, first_frame=first, gamma=GAMMA)
    got = nk.paged_spectrogram_ema(**req, **args, backend=backend)
    want = nk.paged_spectrogram_ema(**req, **args, backend="reference")
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- BAM


def random_bam(window=None, seed=0, zero_value=False):
    s = BAMScorer(window=window)
    g = torch.Generator().manual_seed(seed)
    s.from_flat(0.3 * torch.randn(s.num_params, generator=g))
    if zero_value:
        (w_qkv, b_qkv), *_ = s.layers()
        w_qkv[:, 2 * s.hidden :] = 0
        b_qkv[2 * s.hidden :] = 0
    return s


@pytest.mark.parametrize("n", [1, 17, 200])
def test_bam_sdpa_equals_explicit_attention(n):
    s = random_bam()
    x = torch.randn(3, n, 25)
    torch.testing.assert_close(s(x), s.forward_reference(x), **TOL)
    flats = 0.3 * torch.randn(3, s.num_params)
    torch.testing.assert_close(s(x, flats), s.forward_reference(x, flats), **TOL)


def test_bam_zero_value_projection_skips_attention_exactly():
    """Zero V => attention output 0: the skip must give the same scores as computing it, also when
    only some candidates of a batch have a zero V (evolution populations)."""
    s = random_bam(zero_value=True)
    x = torch.randn(2, 150, 25)
    torch.testing.assert_close(s(x), s.forward_reference(x), **TOL)
    hand = load_weights(HAND_WEIGHTS).build_scorer()  # the shipped hand-set weights: V is zero
    torch.testing.assert_close(hand(x), hand.forward_reference(x), **TOL)
    flats = torch.stack([s.flat, random_bam(seed=1).flat])
    torch.testing.assert_close(s(x, flats), s.forward_reference(x, flats), **TOL)


@pytest.mark.parametrize("window,n", [(1, 50), (4, 50), (7, 64), (16, 300), (49, 50), (64, 50)])
def test_windowed_bam_equals_banded_explicit_attention(window, n):
    s = random_bam(window=window, seed=window)
    x = torch.randn(2, n, 25)
    torch.testing.assert_close(s(x), s.forward_reference(x), **TOL)
    if window + 1 >= n:  # the window covers everything newer: full BAM
        full = BAMScorer()
        full.from_flat(s.flat)
        torch.testing.assert_close(s(x), full(x), **TOL)


@pytest.mark.parametrize("window", [None, 8])
def test_ragged_batch_equals_one_call_per_cache(window):
    s = random_bam(window=window, seed=3)
    xs = [torch.randn(2, n, 25) for n in (10, 200, 33, 1)]
    flats = [None, 0.3 * torch.randn(s.num_params), None, 0.3 * torch.randn(s.num_params)]
    for max_elems in (1 << 26, 1):  # one call, or one call per cache
        got = score_ragged(s, xs, flats, max_elems=max_elems)
        for x, f, g in zip(xs, flats, got, strict=True):
            torch.testing.assert_close(g, s.forward_reference(x, f), **TOL)
    m = MLPScorer()
    m.from_flat(torch.randn(m.num_params))
    for x, g in zip(xs, score_ragged(m, xs, [None] * 4), strict=True):
        torch.testing.assert_close(g, m(x), **TOL)


# ----------------------------------------------------------------------------- whole engine steps

L, KV, H, D, BS = 2, 2, 4, 32, 16


def random_weights_file(tmp_path, kind="bam", window=None, seed=0):
    w = NammWeights.zeros(ScorerConfig(kind=kind, window=window))
    g = torch.Generator().manual_seed(seed)
    w.params = 0.3 * torch.randn(w.params.shape, generator=g)
    path = tmp_path / f"{kind}-{window}-{seed}.safetensors"
    save_weights(path, w)
    return path


def run_steps(cfg, n_tokens=1300, n_requests=3, seed=0, full_columns=False):
    """Every request of a toy paged cache through compute_steps in one batch per step: freed pages.
    ``full_columns``: the policy gets the whole [kv, n_q, n] matrix, whatever rows or sums it reads."""
    g = torch.Generator().manual_seed(seed)
    policy = make_policy(cfg)
    if full_columns:
        policy.attention_window = None
        policy.attention_sums = False
    pool = n_requests * (-(-n_tokens // BS)) + 1
    cache = torch.randn(pool, KV, BS, 2 * D, generator=g)
    layout = nk.PagedKeyLayout.flash(cache)
    tables = torch.randperm(pool, generator=g)[: pool - 1].view(n_requests, -1)
    mems = [RequestMemory(policy, L, BS) for _ in range(n_requests)]
    queries = torch.randn(n_requests, L, n_tokens, H, D, generator=g)
    for start in range(0, n_tokens, cfg.interval):
        n = min(cfg.interval, n_tokens - start)
        jobs = []
        for r, mem in enumerate(mems):
            mem.add_queries([queries[r, layer, start : start + n] for layer in range(L)], start)
            if mem.due(cfg.interval, n_tokens):
                blocks = tables[r, mem.live_pages].long()
                reader = PagedCacheReader(
                    [(cache, layout)] * L, blocks, D**-0.5, backend=cfg.kernels, fused=cfg.kernels == "triton"
                )
                jobs.append(begin_step(mem, reader))
        for step in compute_steps(jobs, cfg, D**-0.5, KV):
            step.finish()
    return [sorted(m.evicted_pages) for m in mems]


@pytest.mark.parametrize("policy", ["namm", "namm-window", "namm-mlp", "h2o", "snapkv"])
def test_engine_steps_free_the_same_pages_on_fast_paths(policy, tmp_path):
    extra: dict = {"page_rule": "majority"}
    if policy.startswith("namm"):
        kind, window = {"namm": ("bam", None), "namm-window": ("bam", 32), "namm-mlp": ("mlp", None)}[policy]
        extra |= {"policy": "namm", "weights": random_weights_file(tmp_path, kind, window)}
    else:
        extra |= {"policy": policy, "budget": {"ratio": 0.3}}
    slow = run_steps(EvictionConfig(kernels="reference", **extra))
    fast = run_steps(EvictionConfig(kernels="torch", **extra))
    assert fast == slow
    assert any(slow), "the check is empty: nothing was freed"


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_engine_steps_reading_only_rows_or_sums_free_the_same_pages(policy):
    """SnapKV's window rows and H2O's sums (never the whole matrix) against the whole matrix."""
    cfg = EvictionConfig(policy=policy, budget={"ratio": 0.3}, page_rule="majority", kernels="torch")
    whole = run_steps(cfg, full_columns=True)
    assert run_steps(cfg) == whole and any(whole)


def test_fused_paged_features_free_the_same_pages():
    """The GPU engine path (fused paged STFT+EMA kernel; the Triton interpreter on CPU)."""
    import tempfile
    from pathlib import Path

    weights = random_weights_file(Path(tempfile.mkdtemp()))
    cfg = dict(policy="namm", weights=weights, page_rule="majority", interval=128)
    slow = run_steps(EvictionConfig(kernels="reference", **cfg), n_tokens=300, n_requests=2)
    fused = run_steps(EvictionConfig(kernels="triton", **cfg), n_tokens=300, n_requests=2)
    assert fused == slow and any(slow)


def test_keys_reader_path_equals_paged_reader():
    """Columns from gathered keys (tests, reference runs) equal columns read from the paged cache."""
    cfg = EvictionConfig(policy="h2o", budget={"ratio": 0.4}, page_rule="majority")
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(L, 704, KV, D, generator=g)
    q = torch.randn(L, 704, H, D, generator=g)
    out = []
    for paged in (False, True):
        mem = RequestMemory(make_policy(cfg), L, BS)
        mem.add_queries([q[layer] for layer in range(L)], 0)
        if paged:
            cache = keys.view(L, -1, BS, KV, D)  # [L, blocks, BS, KV, D], blocks in order
            caches = [(c, nk.PagedKeyLayout.from_key_view(c)) for c in cache]
            reader = PagedCacheReader(caches, torch.arange(cache.shape[1]), D**-0.5, backend="torch")
        else:
            reader = KeysReader(lambda layer: keys[layer])
        out.append(compute_steps([begin_step(mem, reader)], cfg, D**-0.5, KV)[0].plan.free_pages)
    assert out[0] == out[1] and out[0]
