"""The shared interface of error reconstructors: ``E = W - Q(W)`` + statistics → rank-k ``Correction``.

A reconstructor is a pure function ``(error [out, in], stats, rank) -> Correction``; the deployed
layer computes ``y = x Q(W)ᵀ + (x Bᵀ) Aᵀ``, i.e. a LoRA adapter with scaling 1. (The style guide's
signature also passes the weight and the scheme; none of our methods needs them, so they are left
out rather than ignored.) Methods register by name in a closed registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .calibrate import LayerStats


@dataclass(frozen=True)
class Correction:
    A: torch.Tensor
    """``[out, k]``."""
    B: torch.Tensor
    """``[k, in]``."""

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def matrix(self) -> torch.Tensor:
        return self.A @ self.B


Reconstructor = Callable[[torch.Tensor, LayerStats, int], Correction]
RECONSTRUCTORS: dict[str, Reconstructor] = {}


def register(name: str, fn: Reconstructor) -> Reconstructor:
    if name in RECONSTRUCTORS:
        raise ValueError(f"reconstructor {name!r} registered twice")
    RECONSTRUCTORS[name] = fn
    return fn


def truncated(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of ``m`` in float64: ``U_k [out, k]``, ``S_k [k]``, ``Vh_k [k, in]``."""
    u, s, vh = torch.linalg.svd(m.to(torch.float64), full_matrices=False)
    k = min(rank, s.numel())
    return u[:, :k], s[:k], vh[:k]


def as_correction(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> Correction:
    return Correction(a.to(like.dtype).contiguous(), b.to(like.dtype).contiguous())
