"""ASER's error reconstruction: whitening SVD (Zhao et al., "ASER: Activation Smoothing and Error
Reconstruction for LLM Quantization", 2024; the same construction as SVD-LLM's truncation-aware whitening).

With ``C = XᵀX / n = L Lᵀ`` (Cholesky of the calibration input covariance), the output error of a
correction is ``‖X (E − AB)ᵀ‖_F² = n ‖(E − AB) L‖_F²``; so ``E L = U Σ Vᵀ``, ``A = U_k Σ_k``,
``B = V_kᵀ L⁻¹`` (a triangular solve, no inverse) is the rank-k correction with the smallest
*output* error, which neither plain nor scaled SVD minimise. A covariance that is not positive
definite (dead channels, few tokens) gets ``ε · mean(diag C) · I`` added, ε growing from 1e-8.

ASER's second half, activation smoothing with outlier extraction, transforms the weights and
statistics before this runs: see ``aser.py`` (method ``aser``).
"""

from __future__ import annotations

import torch

from ..calibrate import LayerStats
from ..lowrank import Correction, LowRank, as_correction, kept_energy, truncated
from .base import RECONSTRUCTORS, Reconstructor


def cholesky_with_jitter(c: torch.Tensor) -> torch.Tensor:
    c = c.to(torch.float64)
    scale = c.diagonal().mean().clamp(min=1e-30)
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    eps = 0.0
    for _ in range(12):
        l, info = torch.linalg.cholesky_ex(c + eps * scale * eye)
        if info.item() == 0:
            return l
        eps = 1e-8 if eps == 0 else eps * 10
    raise ValueError("input covariance is not positive definite even with jitter 1e3·mean(diag); calibrate on more tokens")


def reconstruct(error: torch.Tensor, stats: LayerStats, cfg: LowRank) -> Correction:
    l = cholesky_with_jitter(stats.covariance)
    whitened = error.to(torch.float64) @ l
    u, s, vh = truncated(whitened, cfg)
    b = torch.linalg.solve_triangular(l, vh, upper=False, left=False)  # B L = V_kᵀ
    return as_correction(u * s, b, error, kept_energy(whitened, s))


@RECONSTRUCTORS.register
class Whiten(Reconstructor):
    name = "whiten"

    def reconstruct(self, error: torch.Tensor, stats: LayerStats, lowrank: LowRank) -> Correction:
        return reconstruct(error, stats, lowrank)
