"""Feature pipeline vs independent references (torch.stft, scipy, python loops)."""

import math

import numpy as np
import pytest
import scipy.signal
import torch

from vllm_namm.config import FeatureConfig
from vllm_namm.features import attention_columns, gqa_average, oldness_embedding
from vllm_namm.kernels import ema_reduce, hann_window, stft_magnitudes
from vllm_namm.policies.namm import NammFeatureState, spectral_features

torch.manual_seed(0)


def test_stft_matches_torch_stft():
    cols, pad = torch.rand(3, 5, 64), torch.rand(3, 5, 16)
    ours = stft_magnitudes(cols, pad)
    x = torch.cat([pad, cols], dim=-1).reshape(-1, 80)
    ref = torch.stft(
        x,
        n_fft=32,
        hop_length=16,
        window=torch.hann_window(32, periodic=True),
        center=False,
        onesided=True,
        return_complex=True,
    ).abs()
    assert ours.shape == (3, 5, 4, 17)
    torch.testing.assert_close(ours, ref.transpose(-1, -2).reshape(3, 5, 4, 17), atol=1e-5, rtol=0)


def test_stft_matches_scipy():
    cols, pad = torch.rand(4, 48), torch.rand(4, 16)
    ours = stft_magnitudes(cols, pad)
    x = torch.cat([pad, cols], dim=-1).double().numpy()
    win = scipy.signal.get_window("hann", 32)  # periodic (fftbins=True)
    np.testing.assert_allclose(win, hann_window(32).double().numpy(), atol=1e-7)
    _, _, z = scipy.signal.stft(
        x,
        window=win,
        nperseg=32,
        noverlap=16,
        boundary=None,
        padded=False,
        detrend=False,
        return_onesided=True,
        scaling="spectrum",
    )
    ref = np.abs(z) * win.sum()  # scipy 'spectrum' scaling divides by sum(window)
    np.testing.assert_allclose(ours.numpy(), ref.transpose(0, 2, 1), atol=1e-5)


def test_stft_needs_multiple_of_hop():
    with pytest.raises(ValueError, match="multiple of the STFT hop"):
        stft_magnitudes(torch.rand(2, 40), torch.zeros(2, 16))


def _ema_loop(frames, prev, first, gamma):
    kv, n, t_frames, f = frames.shape
    out = torch.zeros(kv, n, f, dtype=torch.float64)
    for h in range(kv):
        for i in range(n):
            acc = prev[h, i].double() * gamma**t_frames
            for t in range(t_frames):
                if t >= first[h, i]:
                    acc = acc + (1 - gamma) * gamma ** (t_frames - 1 - t) * frames[h, i, t].double()
            out[h, i] = acc
    return out.float()


def test_ema_matches_python_loop_with_carried_state():
    gamma = 0.99**16
    frames, prev = torch.rand(2, 6, 5, 17), torch.rand(2, 6, 17)
    first = torch.randint(0, 5, (2, 6))
    torch.testing.assert_close(ema_reduce(frames, prev, first, gamma), _ema_loop(frames, prev, first, gamma))


def test_ema_direction_newest_frame_weighs_most():
    gamma = 0.5
    frames = torch.zeros(1, 1, 4, 1)
    frames[..., -1, 0] = 1.0
    assert ema_reduce(frames, None, None, gamma).item() == pytest.approx(1 - gamma)  # weight gamma^0
    frames = torch.zeros(1, 1, 4, 1)
    frames[..., 0, 0] = 1.0
    assert ema_reduce(frames, None, None, gamma).item() == pytest.approx((1 - gamma) * gamma**3)
    assert ema_reduce(torch.zeros(1, 1, 4, 1), torch.ones(1, 1, 1), None, gamma).item() == pytest.approx(
        gamma**4
    )


def _causal_attn(kv, n_q, n_k, q_start):
    logits = torch.randn(kv, n_q, n_k)
    qpos = torch.arange(q_start, q_start + n_q)
    logits = logits.masked_fill(torch.arange(n_k).view(1, 1, -1) > qpos.view(1, -1, 1), float("-inf"))
    return torch.softmax(logits, -1), qpos


def test_two_chunks_equal_one_pass_over_the_whole_column():
    """Carried pad + carried EMA make two 32-query chunks equal one STFT of the 64 queries."""
    cfg = FeatureConfig(n_up=32)
    attn, qpos = _causal_attn(2, 64, 64, 0)
    state = NammFeatureState(cfg)
    spectral_features(attn[:, :32, :32], torch.arange(32).expand(2, -1), qpos[:32], 32, state)
    ema, bad = spectral_features(attn[:, 32:, :], torch.arange(64).expand(2, -1), qpos[32:], 32, state)
    assert not bad.any()
    cols = attn.transpose(1, 2)  # [2, 64, 64]
    frames = stft_magnitudes(cols, torch.zeros(2, 64, 16))  # 4 frames over the whole column
    first = (torch.arange(64) // 16).expand(2, -1)  # token i enters at query i
    ref = ema_reduce(frames, None, first, cfg.gamma)
    torch.testing.assert_close(ema, ref, atol=1e-6, rtol=1e-5)


def test_state_filter_per_head_and_shared():
    cfg = FeatureConfig(n_up=16)
    attn, qpos = _causal_attn(2, 16, 16, 0)
    state = NammFeatureState(cfg)
    ema, _ = spectral_features(attn, torch.arange(16).expand(2, -1), qpos, 16, state)
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[0, [1, 5, 9]] = True
    keep[1, [2, 3, 15]] = True
    state.filter(keep)
    torch.testing.assert_close(state.ema[0], ema[0, [1, 5, 9]])
    torch.testing.assert_close(state.ema[1], ema[1, [2, 3, 15]])
    state.filter(torch.tensor([True, False, True]))
    assert state.ema.shape == (2, 2, 17) and state.pad.shape == (2, 2, 16)
    with pytest.raises(ValueError, match="equal counts"):
        state.filter(torch.tensor([[True, False], [True, True]]))


def test_gqa_average_and_attention_columns():
    q, k = torch.randn(5, 4, 8), torch.randn(7, 2, 8)
    qpos, kpos = torch.arange(2, 7), torch.arange(7)
    cols = attention_columns(q, k, qpos, kpos)
    logits = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, dim=1)) / math.sqrt(8)
    logits = logits.masked_fill(kpos.view(1, 1, -1) > qpos.view(1, -1, 1), float("-inf"))
    ref = gqa_average(torch.softmax(logits, -1), 2)
    torch.testing.assert_close(cols, ref)
    assert cols[:, 0, 3:].abs().sum() == 0  # query at position 2 sees keys 0..2 only
    torch.testing.assert_close(ref, torch.softmax(logits, -1).view(2, 2, 5, 7).mean(1))


def test_oldness_embedding_formula():
    o = torch.tensor([1, 7, 100000])
    emb = oldness_embedding(o, 8, 50000.0)
    f = 50000.0 ** (-np.arange(4) / 4)
    ref = np.concatenate([np.sin(o.numpy()[:, None] * f), np.cos(o.numpy()[:, None] * f)], -1)
    np.testing.assert_allclose(emb.numpy(), ref, atol=1e-6)


def test_nan_attention_marks_tokens_bad_and_keeps_state_finite():
    cfg = FeatureConfig(n_up=16)
    attn, qpos = _causal_attn(2, 16, 16, 0)
    attn[0, 3, :] = float("nan")
    state = NammFeatureState(cfg)
    ema, bad = spectral_features(attn, torch.arange(16).expand(2, -1), qpos, 16, state)
    assert bad[0].any() and not bad[1].any()
    assert torch.isfinite(state.ema).all() and torch.isfinite(state.pad).all()


def test_oldness_starts_at_zero_and_is_recorded_in_weights(tmp_path):
    """evo-memory's stage configs (base_bam.yaml: start_recency_from 0) give the newest token oldness 0."""
    from vllm_namm.features import token_features
    from vllm_namm.weights import NammWeights, describe, load_weights, save_weights

    cfg = FeatureConfig()
    assert cfg.start_oldness_from == 0
    positions = torch.tensor([[0, 95, 100]])
    x = token_features(torch.zeros(1, 3, 17), positions, 100, cfg, torch.zeros(17), torch.ones(17))
    f = [50000.0 ** (-j / 4) for j in range(4)]
    by_hand = [[math.sin(o * fj) for fj in f] + [math.cos(o * fj) for fj in f] for o in (100, 5, 0)]
    torch.testing.assert_close(x[0, :, :8], torch.tensor(by_hand), atol=1e-6, rtol=0)
    assert x[0, 2, :8].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # the newest token: oldness 0
    path = tmp_path / "w.safetensors"
    save_weights(path, NammWeights.zeros())
    assert load_weights(path).features.start_oldness_from == 0
    assert "oldness from 0" in describe(load_weights(path))
