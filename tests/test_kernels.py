"""Triton kernels vs their torch references (namm_kernels).

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set
below before the kernels are decorated) on small shapes; with CUDA the same tests run
compiled, plus the larger ``gpu_only`` shapes.
"""

from __future__ import annotations

from triton_interpreter import CUDA  # first: sets TRITON_INTERPRET when there is no CUDA

# isort: split

import sys

import namm_kernels as nk
import pytest
import torch
from namm_kernels import PagedKeyLayout

DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="large shape: compiled Triton on CUDA only")

# (rtol, atol) on attention probabilities; the reference sees the same rounded inputs and
# computes in fp32, so low-precision error comes only from the kernel's dot products.
TOL = {torch.float32: (1e-5, 1e-7), torch.bfloat16: (2e-3, 2e-5), torch.float16: (2e-3, 2e-5)}


def make_cache(kind: str, num_blocks: int, block_size: int, hkv: int, d: int, dtype, seed: int = 0):
    """Random cache of a layout kind, and the layout describing it."""
    g = torch.Generator().manual_seed(seed)
    if kind == "flash_legacy":
        kv = torch.randn(2, num_blocks, block_size, hkv, d, generator=g)
    else:  # vLLM 0.32 FlashAttention and CPU caches are both [B, H, N, 2D] logically
        kv = torch.randn(num_blocks, hkv, block_size, 2 * d, generator=g)
    kv = kv.to(dtype).to(DEVICE)
    if kind.startswith("cpu_"):
        return kv, PagedKeyLayout.cpu(kv, kind[4:])
    return kv, PagedKeyLayout.flash(kv)


def make_request(kind, hq, hkv, d, block_size, n_q, n_live, dtype, seed=0):
    """A request with holes: live blocks are a shuffled subset of the pool, holes are NaN-poisoned."""
    g = torch.Generator().manual_seed(seed + 1)
    n_blocks = -(-n_live // block_size)
    pool = 2 * n_blocks + 3
    kv, layout = make_cache(kind, pool, block_size, hkv, d, dtype, seed)
    perm = torch.randperm(pool, generator=g)
    live, dead = perm[:n_blocks], perm[n_blocks:]
    if kind == "flash_legacy":
        kv[:, dead] = float("nan")
    else:
        kv[dead] = float("nan")
    # logical positions with gaps (evicted tokens); the queries are the newest tokens
    pos = torch.sort(torch.randperm(3 * n_live, generator=g)[:n_live]).values
    q = torch.randn(n_q, hq, d, generator=g).to(dtype)
    return dict(
        q=q.to(DEVICE),
        key_cache=kv,
        layout=layout,
        block_table=live.to(torch.int32).to(DEVICE),
        positions=pos.to(DEVICE),
        query_positions=pos[-n_q:].clone().to(DEVICE),
        scale=d**-0.5,
    )


# (kind, q heads, kv heads, head dim, block size, n_q, n_live, dtype)
CASES = [
    ("flash_legacy", 4, 2, 64, 16, 48, 100, torch.float32),
    ("flash", 4, 2, 128, 32, 16, 150, torch.float32),
    ("cpu_vec", 32, 8, 64, 32, 16, 70, torch.float32),
    ("cpu_vec16", 4, 2, 64, 16, 32, 90, torch.float32),
    ("cpu_amx", 4, 2, 128, 32, 16, 80, torch.bfloat16),
    ("flash", 4, 2, 64, 16, 48, 120, torch.bfloat16),
    ("flash_legacy", 4, 2, 64, 32, 16, 60, torch.float16),
]
GPU_CASES = [
    pytest.param(k, 32, 8, 128, bs, 512, n, dt, marks=gpu_only)
    for k in ("flash", "flash_legacy")
    for bs, n in ((16, 4133), (32, 9001))
    for dt in (torch.float32, torch.bfloat16)
]
ALL = [
    pytest.param(*c, id=f"{c[0]}-{c[1]}x{c[2]}-d{c[3]}-bs{c[4]}-q{c[5]}-n{c[6]}-{str(c[7])[6:]}")
    for c in CASES
]
ALL += GPU_CASES


def close(a, b, dtype, what):
    rtol, atol = TOL[dtype]
    assert torch.isfinite(a).all(), f"{what}: non-finite values (read a poisoned hole?)"
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- layouts


def test_flash_layouts_gather_the_right_keys():
    nb, bs, h, d = 5, 16, 2, 8
    legacy = torch.randn(2, nb, bs, h, d)
    bt = torch.tensor([3, 0, 4])
    got = nk.gather_keys(legacy, PagedKeyLayout.flash(legacy), bt)
    torch.testing.assert_close(got, legacy[0][bt].reshape(-1, h, d), rtol=0, atol=0)
    # vLLM 0.32: logical [B, H, N, 2D], stored N-major ([B, N, H, 2D] physically)
    phys = torch.randn(nb, bs, h, 2 * d)
    v032 = phys.permute(0, 2, 1, 3)
    got = nk.gather_keys(v032, PagedKeyLayout.flash(v032), bt)
    torch.testing.assert_close(got, phys[bt][..., :d].reshape(-1, h, d), rtol=0, atol=0)


@pytest.mark.parametrize(
    "isa,dtype,block_size,d",
    [("vec", torch.float32, 32, 64), ("vec16", torch.float16, 16, 80), ("amx", torch.bfloat16, 32, 128)],
)
def test_cpu_layout_matches_vllm_reshape_and_cache(isa, dtype, block_size, d):
    """The packed CPU key layouts, checked against the installed vLLM op that writes them."""
    ops = pytest.importorskip("vllm._custom_ops")
    if not hasattr(torch.ops._C, "cpu_attn_reshape_and_cache"):
        pytest.skip("vLLM CPU ops are not built in this environment")
    nb, h = 5, 3
    kv = torch.zeros(nb, h, block_size, 2 * d, dtype=dtype)
    key_cache, value_cache = kv.view(nb, h, 2 * block_size, d).chunk(2, dim=2)
    slots = torch.randperm(nb * block_size, generator=torch.Generator().manual_seed(0))
    key = torch.randn(slots.numel(), h, d).to(dtype)
    try:
        ops.cpu_attn_reshape_and_cache(key, torch.randn_like(key), key_cache, value_cache, slots, isa)
    except RuntimeError as e:  # e.g. amx on a CPU without AVX-512/AMX
        if "Unsupported CPU attention configuration" in str(e):
            pytest.skip(f"this CPU's vLLM build cannot write the {isa} layout: {e}")
        raise
    got = nk.gather_keys(kv, PagedKeyLayout.cpu(kv, isa), torch.arange(nb))
    want = torch.empty_like(key)
    want[slots] = key
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- attention columns


@pytest.mark.parametrize("kind,hq,hkv,d,bs,n_q,n_live,dtype", ALL)
def test_attention_columns_kernel_matches_reference(kind, hq, hkv, d, bs, n_q, n_live, dtype):
    req = make_request(kind, hq, hkv, d, bs, n_q, n_live, dtype)
    ref = nk.attention_columns_paged_ref(**req)
    out = torch.full((hkv, n_q, n_live), float("nan"), device=DEVICE)  # poisoned
    got = nk.attention_columns_paged_triton(**req, block_n=32, out=out)
    assert got.data_ptr() == out.data_ptr()
    close(got, ref, dtype, "columns")
    # every query sees at least itself: the GQA-averaged rows are distributions
    torch.testing.assert_close(got.sum(-1), torch.ones(hkv, n_q, device=DEVICE), rtol=1e-4, atol=1e-4)
    # causality by logical position: key newer than the query gets exactly zero
    future = req["positions"].view(1, 1, -1) > req["query_positions"].view(1, -1, 1)
    assert (got.masked_select(future.expand_as(got)) == 0).all()


def test_attention_columns_follow_their_inputs():
    """A perturbed live key changes its column (and only its own column's share); a query with no
    visible key gives a zero row."""
    req = make_request("cpu_vec", 4, 2, 64, 16, 16, 40, torch.float32)
    base = nk.attention_columns_paged_triton(**req, block_n=16)
    j = 7  # live token 7 -> compacted block 0, slot 7
    blk = int(req["block_table"][j // 16])
    req["key_cache"][blk, 1, :, :].view(-1)[: 64 * 16].view(64, 16)[:, j % 16] += 3.0  # vec layout: [D, N]
    moved = nk.attention_columns_paged_triton(**req, block_n=16)
    assert not torch.allclose(moved[1, :, j], base[1, :, j])
    torch.testing.assert_close(moved[0], base[0], rtol=0, atol=0)  # other KV head untouched
    req["query_positions"] = req["query_positions"].clone()
    req["query_positions"][0] = int(req["positions"][0]) - 1
    blind = nk.attention_columns_paged_triton(**req, block_n=16)
    assert (blind[:, 0] == 0).all()


# ----------------------------------------------------------------------------- spectrogram + EMA


def spectro_inputs(hkv=2, n_q=48, n_tok=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = torch.rand(hkv, n_q, n_tok, generator=g)
    pad = torch.rand(hkv, n_tok, 16, generator=g)
    state = torch.rand(hkv, n_tok, 17, generator=g)
    first = torch.randint(0, n_q // 16, (n_tok,), generator=g, dtype=torch.int32)
    return [t.to(DEVICE) for t in (cols, pad, state, first)]


@pytest.mark.parametrize("n_q,n_tok", [(16, 33), (48, 70), pytest.param(512, 5000, marks=gpu_only)])
def test_spectrogram_ema_kernel_matches_reference(n_q, n_tok):
    cols, pad, state, first = spectro_inputs(n_q=n_q, n_tok=n_tok)
    ref_state, ref_pad = nk.spectrogram_ema_ref(cols, pad, state, first, gamma=0.9)
    out = (torch.full_like(ref_state, float("nan")), torch.full_like(ref_pad, float("nan")))
    got_state, got_pad = nk.spectrogram_ema_triton(cols, pad, state, first, gamma=0.9, out=out)
    torch.testing.assert_close(got_state, ref_state, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_pad, ref_pad, rtol=0, atol=0)
    # strided (transposed) columns are read through their strides
    t_state, _ = nk.spectrogram_ema_triton(
        cols.transpose(1, 2).contiguous().transpose(1, 2), pad, state, first, 0.9
    )
    torch.testing.assert_close(t_state, ref_state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", ["ref", "triton"])
def test_spectrogram_ema_chunks_compose(fn):
    """Two chunks with carried pad/state equal one chunk over both: direction and carry are right."""
    spec = getattr(nk, f"spectrogram_ema_{fn}")
    cols, _, _, first = spectro_inputs(n_q=64, n_tok=20, seed=3)
    first = first.clamp(max=1)  # tokens entered during the first chunk
    whole, _ = spec(cols, None, None, first, 0.8)
    s1, p1 = spec(cols[:, :32], None, None, first, 0.8)
    s2, p2 = spec(cols[:, 32:], p1, s1, None, 0.8)
    torch.testing.assert_close(s2, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p2, cols[:, -16:].transpose(1, 2), rtol=0, atol=0)


def test_spectrogram_ema_weights_newest_frame_most():
    """A column that is non-zero only in one frame gets (1-γ)γ^(n_T-1-t) of that frame's spectrum."""
    gamma, n_q = 0.5, 64
    cols = torch.zeros(1, n_q, 2, device=DEVICE)
    cols[0, 48:, 0] = 1.0  # only in the newest frame's second half (frame 3)
    cols[0, :16, 1] = 1.0  # only in frame 0's second half (and frame 1's first half)
    state, _ = nk.spectrogram_ema_triton(cols, gamma=gamma)
    ref, _ = nk.spectrogram_ema_ref(cols, gamma=gamma)
    torch.testing.assert_close(state, ref, rtol=1e-5, atol=1e-6)
    dc = torch.hann_window(32, periodic=True)[16:].sum().item()  # DC bin of a half-frame of ones
    assert state[0, 0, 0].item() == pytest.approx((1 - gamma) * dc, rel=1e-5)
    assert state[0, 0, 0] > state[0, 1, 0]  # older energy weighs less
    first = torch.tensor([3, 3], dtype=torch.int32, device=DEVICE)
    masked, _ = nk.spectrogram_ema_triton(cols, first_frame=first, gamma=gamma)
    assert masked[0, 1].abs().max() == 0 and masked[0, 0, 0] == state[0, 0, 0]


# ----------------------------------------------------------------------------- fused path


@pytest.mark.parametrize("kind,hq,hkv,d,bs,n_q,n_live,dtype", ALL)
def test_fused_paged_spectrogram_matches_reference(kind, hq, hkv, d, bs, n_q, n_live, dtype):
    req = make_request(kind, hq, hkv, d, bs, n_q, n_live, dtype, seed=5)
    g = torch.Generator().manual_seed(9)
    prev_pad = (0.1 * torch.rand(hkv, n_live, 16, generator=g)).to(DEVICE)
    prev_state = torch.rand(hkv, n_live, 17, generator=g).to(DEVICE)
    first = nk.first_valid_frame(req["positions"], req["query_positions"])
    kw = dict(prev_pad=prev_pad, prev_state=prev_state, first_frame=first)
    ref_state, ref_pad = nk.paged_spectrogram_ema_ref(**req, **kw)
    out = (torch.full_like(ref_state, float("nan")), torch.full_like(ref_pad, float("nan")))
    got_state, got_pad = nk.paged_spectrogram_ema_triton(**req, **kw, block_n=32, out=out)
    close(got_state, ref_state, dtype, "ema state")
    close(got_pad, ref_pad, dtype, "carried pad")
    # the state must depend on the attention, not only on the carried state
    bare, _ = nk.paged_spectrogram_ema_triton(
        **req, prev_pad=prev_pad, prev_state=torch.zeros_like(prev_state), first_frame=first, block_n=32
    )
    assert bare.abs().amax() > 0


# ----------------------------------------------------------------------------- dispatch


def test_backend_switch():
    req = make_request("flash", 4, 2, 64, 16, 16, 20, torch.float32)
    assert nk.resolve_backend("auto", req["q"]) == ("triton" if CUDA else "torch")
    assert nk.resolve_backend("torch", req["q"]) == "torch"
    with pytest.raises(ValueError):
        nk.resolve_backend("cuda", req["q"])  # type: ignore[arg-type]
    a = nk.attention_columns_paged(**req, backend="torch")
    b = nk.attention_columns_paged(**req, backend="triton")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    s_t, p_t = nk.paged_spectrogram_ema(**req, backend="torch")
    s_k, p_k = nk.paged_spectrogram_ema(**req, backend="triton")
    torch.testing.assert_close(s_t, s_k, rtol=1e-5, atol=1e-7)
    s_m, _ = nk.spectrogram_ema(a, backend="auto")
    torch.testing.assert_close(s_m, s_t, rtol=1e-5, atol=1e-7)


def test_namm_kernels_is_not_top_level_kernels():
    assert nk.__name__ == "namm_kernels"
    assert "kernels" not in sys.modules or sys.modules["kernels"] is not nk
