"""The shipped default NAMM weights: a hand-set, documented starting point (not evolved).

Rule: **evict a token whose attention energy is negligible, keep the rest.** The EMA'd DC
bin of a token's attention spectrogram is ``sum_t hann_t * a_t`` smoothed over frames; for a
token that steadily receives mean attention ``a`` it converges to ``sum(hann) * a = 16 a``
(the EMA weights sum to ~1). We keep a token iff that DC value is at least
``16 * MIN_MEAN_ATTENTION`` with ``MIN_MEAN_ATTENTION = 2**-15``: a token each query gives on
average less than 1/32768 of its attention is dropped. (Uniform attention over 32k tokens
sits right at the line; real attention is far more concentrated, so most tokens of a long
context fall well below it and the few that matter stay above.)

Realisation: a BAM scorer (hidden 32, as the evolution starts from) with every parameter 0
except the final linear layer: weight 1 on the normalised DC feature, bias chosen so that the
score is ``(dc - threshold) / std``. Attention and mixing layers are 0, so the BAM passes its
input through unchanged (``x * (1 + 0) + 0``) and CMA-ES can start from this vector too.

Normalisation statistics (needed by the file format; they only rescale this rule) come from a
deterministic synthetic calibration: 4 KV heads, a 2048-token sequence in 512-query chunks,
causal softmax attention over N(0, 2^2) logits, run through the real feature pipeline.

Regenerate with ``python -m evolve.initial_weights`` (writes ``data/initial_weights.safetensors``).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from vllm_namm.policies.namm import NammFeatureState, spectral_features
from vllm_namm.scorers import ScorerConfig, make_scorer
from vllm_namm.settings import FeatureConfig
from vllm_namm.shipped_weights import HAND_WEIGHTS
from vllm_namm.weights import NammWeights, Provenance, save_weights

MIN_MEAN_ATTENTION = 2.0**-15


def calibration_stats(
    features: FeatureConfig, seq_len: int = 2048, heads: int = 4, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Per-bin mean/std of the EMA'd spectrogram on synthetic causal attention (see module doc)."""
    gen = torch.Generator().manual_seed(seed)
    state = NammFeatureState(features)
    samples = []
    n_up = features.n_up
    for start in range(0, seq_len, n_up):
        n_k = start + n_up
        logits = 2.0 * torch.randn(heads, n_up, n_k, generator=gen)
        qpos = torch.arange(start, n_k)
        kpos = torch.arange(n_k)
        logits = logits.masked_fill(kpos.view(1, 1, -1) > qpos.view(1, -1, 1), float("-inf"))
        attn = torch.softmax(logits, dim=-1)
        ema, _ = spectral_features(attn, kpos.expand(heads, -1), qpos, n_up, state)
        samples.append(ema.reshape(-1, features.bins))
    x = torch.cat(samples)
    return x.mean(dim=0), x.std(dim=0)


def build_initial_weights(features: FeatureConfig | None = None) -> NammWeights:
    features = features or FeatureConfig()
    scorer_cfg = ScorerConfig(kind="bam", input_dim=features.input_dim, hidden=32, bias=True)
    scorer = make_scorer(scorer_cfg)
    mean, std = calibration_stats(features)
    dc = features.pos_dims  # feature order: [oldness (pos_dims), spectrogram bins]; bin 0 = DC
    threshold_dc = features.n_w / 2 * MIN_MEAN_ATTENTION  # sum of a periodic Hann window = n_w / 2
    flat = torch.zeros(scorer.num_params)
    w_s, b_s = scorer.layers(flat)[-1]  # views into flat
    w_s[dc, 0] = 1.0
    b_s[0] = (mean[dc] - threshold_dc) / std[dc].clamp_min(1e-7)
    return NammWeights(
        scorer=scorer_cfg,
        features=features,
        params=flat,
        norm_mean=mean,
        norm_std=std,
        threshold=0.0,
        provenance=Provenance(
            description=(
                "hand-set: keep iff EMA'd attention DC >= 16 * 2^-15 (mean attention 1/32768); "
                "stats from synthetic causal N(0,4)-logit attention; see evolve/initial_weights.py"
            ),
        ),
    )


def main() -> int:
    w = build_initial_weights()
    HAND_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_weights(HAND_WEIGHTS, w)
    print(f"wrote {HAND_WEIGHTS} ({w.params.numel()} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
