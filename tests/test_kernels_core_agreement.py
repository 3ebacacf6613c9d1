"""namm_kernels (torch references and Triton kernels) agree with the core library's
feature functions in ``vllm_namm.features`` — one definition of NAMM's features."""

from __future__ import annotations

from triton_interpreter import CUDA  # first: sets TRITON_INTERPRET when there is no CUDA

# isort: split

import namm_kernels as nk
import pytest
import torch

features = pytest.importorskip("vllm_namm.features")  # only an import error skips

DEVICE = "cuda" if CUDA else "cpu"
GAMMA = 0.99**16


def request(hq=4, hkv=2, d=64, bs=16, n_q=48, n_live=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_blocks = -(-n_live // bs)
    pool = 2 * n_blocks + 1
    kv = torch.randn(2, pool, bs, hkv, d, generator=g).to(DEVICE)
    bt = torch.randperm(pool, generator=g)[:n_blocks].to(torch.int32).to(DEVICE)
    pos = torch.sort(torch.randperm(3 * n_live, generator=g)[:n_live]).values.to(DEVICE)
    q = torch.randn(n_q, hq, d, generator=g).to(DEVICE)
    return dict(q=q, key_cache=kv, layout=nk.PagedKeyLayout.flash(kv), block_table=bt, positions=pos,
                query_positions=pos[-n_q:].clone(), scale=d**-0.5)


def core_columns(req):
    keys = nk.gather_keys(req["key_cache"], req["layout"], req["block_table"])[: req["positions"].numel()]
    return features.attention_columns(req["q"], keys, req["query_positions"], req["positions"], req["scale"])


def core_ema(columns, pad, state, first, gamma):
    """Core pipeline: columns [kv, n_q, n] -> (EMA [kv, n, 17], new pad [kv, n, 16])."""
    cols = columns.transpose(1, 2)
    frames = features.stft_magnitudes(cols, pad, 32, 16)
    return features.ema_reduce(frames, state, first, gamma), cols[..., -16:]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_columns_agree_with_core(backend):
    req = request()
    got = nk.attention_columns_paged(**req, backend=backend)
    torch.testing.assert_close(got, core_columns(req), rtol=1e-5, atol=1e-7)


def test_first_valid_frame_agrees_with_core():
    req = request(n_q=64, n_live=200, seed=2)
    ours = nk.first_valid_frame(req["positions"], req["query_positions"])
    core = features.first_frame_index(req["positions"], req["query_positions"], 16)
    assert torch.equal(ours.long(), core.long())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_spectrogram_ema_agrees_with_core(backend):
    g = torch.Generator().manual_seed(1)
    hkv, n_q, n = 2, 48, 37
    cols = torch.rand(hkv, n_q, n, generator=g).to(DEVICE)
    pad = torch.rand(hkv, n, 16, generator=g).to(DEVICE)
    state = torch.rand(hkv, n, 17, generator=g).to(DEVICE)
    first = torch.randint(0, 3, (n,), generator=g).to(DEVICE)
    got_state, got_pad = nk.spectrogram_ema(cols, pad, state, first.to(torch.int32), GAMMA, backend=backend)
    want_state, want_pad = core_ema(cols, pad, state, first, GAMMA)
    torch.testing.assert_close(got_state, want_state, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_pad, want_pad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_pipeline_agrees_with_core(backend):
    req = request(hq=8, hkv=2, d=128, bs=32, n_q=32, n_live=75, seed=4)
    g = torch.Generator().manual_seed(5)
    n = req["positions"].numel()
    pad = (0.05 * torch.rand(2, n, 16, generator=g)).to(DEVICE)
    state = torch.rand(2, n, 17, generator=g).to(DEVICE)
    first = features.first_frame_index(req["positions"], req["query_positions"], 16)
    got_state, got_pad = nk.paged_spectrogram_ema(
        **req, prev_pad=pad, prev_state=state, first_frame=first.to(torch.int32), gamma=GAMMA, backend=backend)
    want_state, want_pad = core_ema(core_columns(req), pad, state, first, GAMMA)
    torch.testing.assert_close(got_state, want_state, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_pad, want_pad, rtol=1e-5, atol=1e-7)
