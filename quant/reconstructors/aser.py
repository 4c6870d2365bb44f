"""ASER's activation smoothing (Zhao et al., 2024), our reading of the abstract, as SmoothQuant does it.

A few input channels carry activations far larger than the rest and make per-token activation
quantization lossy. For the Linears that share one input, ``f_j = max|x_j|^α / max_i |W[i, j]|^(1−α)``
(weights of the whole group), then ``x_j / f_j`` and ``W[:, j] · f_j``: the product is unchanged,
activations become smooth, and the weight columns that grew are the ones whose error the whitened
low-rank factors (computed on the smoothed statistics) take up — reading (a) of "outlier
extraction" in ``shared/docs/postpass.md``; reading (b) (cutting the columns out before quantizing)
is not implemented. ``outliers=k`` smooths only the k channels with the largest ``max|x_j|``
(factor 1 elsewhere); ``None`` smooths every channel. The statistics of ``x/f`` follow exactly from
those of ``x``, so no second calibration pass is needed.
"""

from __future__ import annotations

import torch

from qaft.quant.calibrate import LayerStats


def factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float, outliers: int | None) -> torch.Tensor:
    """``f`` (``[in]``, float64) for Linears with weights ``[out_i, in]`` that share an input with ``act_absmax``."""
    a = act_absmax.to(torch.float64).clamp(min=1e-5)
    w = torch.cat([x.detach().abs().to(torch.float64) for x in weights]).amax(0).clamp(min=1e-5)
    f = a.pow(alpha) / w.pow(1 - alpha)
    if outliers is not None:
        keep = torch.zeros_like(f, dtype=torch.bool)
        keep[a.topk(min(outliers, a.numel())).indices] = True
        f = torch.where(keep, f, torch.ones_like(f))
    return f


def smoothed_stats(st: LayerStats, f: torch.Tensor) -> LayerStats:
    """Statistics of ``x / f`` from those of ``x``."""
    inv = 1.0 / f.to(torch.float64)
    return LayerStats(st.in_features, st.n_tokens, st.abs_mean_max * inv, st.abs_max * inv, st.xtx * inv[:, None] * inv[None, :])
