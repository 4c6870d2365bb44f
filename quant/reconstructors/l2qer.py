"""L2QER: LQER with an activation-induced scale (Zhang et al., ICML 2024, Sec. 3.2).

``s_j`` = max over calibration batches of the batch mean of ``|x_j|`` (the authors' code), clamped
at 1e-4 and divided by ``sqrt(min s · max s)`` (only the ratios change the subspace). Then
``E diag(s) = U Σ Vᵀ``, ``A = U_k Σ_k``, ``B = V_kᵀ diag(s)⁻¹``: the rank-k approximation that is
optimal in the column-weighted norm ``‖(E − AB) diag(s)‖_F``, so channels that carry large
activations are reconstructed more faithfully. With all ``s_j`` equal it is plain LQER.
"""

from __future__ import annotations

import torch

from ..calibrate import LayerStats
from ..lowrank import Correction, LowRank, as_correction, kept_energy, truncated
from .base import RECONSTRUCTORS, Reconstructor


def activation_scale(stats: LayerStats) -> torch.Tensor:
    s = stats.abs_mean_max.to(torch.float64).clamp(min=1e-4)
    return s / torch.sqrt(s.min() * s.max())


def reconstruct(error: torch.Tensor, stats: LayerStats, cfg: LowRank) -> Correction:
    s = activation_scale(stats)
    scaled = error.to(torch.float64) * s
    u, sv, vh = truncated(scaled, cfg)
    return as_correction(u * sv, vh / s, error, kept_energy(scaled, sv))


@RECONSTRUCTORS.register
class L2QER(Reconstructor):
    name = "l2qer"

    def reconstruct(self, error: torch.Tensor, stats: LayerStats, lowrank: LowRank) -> Correction:
        return reconstruct(error, stats, lowrank)
