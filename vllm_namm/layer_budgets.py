"""How a budget is spread over per-layer pages (``granularity`` "layer"): each layer's share of it.

With pages shared by every layer, a budget is one number per request. With per-layer pages each
layer keeps its own pages, so the same memory can be spread unevenly: PyramidKV (Cai et al.,
2024) gives the lower layers, whose attention is broad, more of it than the upper ones, whose
attention is concentrated. A share is relative to the mean layer, so the shares of a model's layers
add up to the number of layers and the total memory equals the uniform budget's.
"""

from __future__ import annotations

from vllm_namm.settings import LayerBudget

PYRAMID_BETA = 20.0
"""PyramidKV's default: the last layer keeps 1 / beta of the mean layer's budget."""


def layer_budget_scales(kind: LayerBudget, num_layers: int, beta: float = PYRAMID_BETA) -> list[float]:
    """Each layer's share of the budget, first layer first (mean 1).

    ``pyramid``: PyramidKV's arithmetic sequence, from ``2 - 1/beta`` at the first layer down to
    ``1/beta`` at the last (k_{m-1} = k_total / (beta m), k_0 = 2 k_total / m - k_{m-1}).
    """
    if num_layers <= 0:
        return []
    if kind == "uniform" or num_layers == 1:
        return [1.0] * num_layers
    low = 1.0 / beta
    high = 2.0 - low
    step = (high - low) / (num_layers - 1)
    return [high - i * step for i in range(num_layers)]
