"""LQER, plain form (Zhang et al., "LQER: Low-Rank Quantization Error Reconstruction for LLMs", ICML 2024).

``E = U Σ Vᵀ``, keep the top k: ``A = U_k Σ_k``, ``B = V_kᵀ``. Minimises ``‖E − AB‖_F`` (Eckart–Young),
blind to which input channels matter; the baseline the activation-aware variants improve on.
"""

from __future__ import annotations

import torch

from ..calibrate import LayerStats
from ..lowrank import Correction, LowRank, as_correction, kept_energy, truncated
from .base import RECONSTRUCTORS, Reconstructor


def reconstruct(error: torch.Tensor, stats: LayerStats | None, cfg: LowRank) -> Correction:
    u, s, vh = truncated(error, cfg)
    return as_correction(u * s, vh, error, kept_energy(error, s))


@RECONSTRUCTORS.register
class LQER(Reconstructor):
    name = "lqer"
    reads_statistics = False

    def reconstruct(self, error: torch.Tensor, stats: LayerStats | None, lowrank: LowRank) -> Correction:
        return reconstruct(error, stats, lowrank)
