"""LoftQ initialisation (Li et al., 2023) against qaft's own quantizer.

Find a grid weight ``Q`` and a rank-``r`` adapter with ``Q + s·BA ≈ W`` by alternating
``Q ← quantize(W − s·BA)`` and ``s·BA ← SVD_r(W − Q)``. Each iteration's residual
``‖W − Q − s·BA‖_F`` is returned so callers can report it; after the first it is below plain
RTN's ``‖W − Q(W)‖_F`` by at least the top-``r`` singular values of the RTN error.

How this differs from ``peft``'s LoftQ (``peft.utils.loftq_utils.loftq_init``), which we do not call:
- the quantizer is the run's ``QuantScheme`` (int / MXINT, per-channel or group grids, the same
  RTN that ``qaft quantize`` and the export use), where peft uses bitsandbytes NF4 (or its int8)
  and needs CUDA;
- peft stores ``B = U√S``, ``A = √S Vh`` and ignores the LoRA scaling ``s = lora_alpha / r``, so its
  init is exact only when ``lora_alpha == r``; we divide by ``s`` so that ``s·BA`` is the SVD term
  for every ``lora_alpha``;
- like peft, the singular values are split evenly (``√S`` on both factors), and the iteration stops
  after computing the last SVD (the returned ``Q`` is the one the last SVD was taken against).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import quantize_weight, working
from .scheme import WeightQuant


@dataclass(frozen=True)
class LoftQResult:
    base: torch.Tensor
    """``[out, in]`` the grid weight ``Q(W − s·BA)`` (de-quantized values), in ``W``'s dtype."""
    lora_A: torch.Tensor
    """``[r, in]`` peft's ``lora_A`` (applied first)."""
    lora_B: torch.Tensor
    """``[out, r]`` peft's ``lora_B``."""
    residuals: list[float]
    """``‖W − Q − s·BA‖_F`` after each iteration."""
    rtn_residual: float
    """``‖W − Q(W)‖_F``: plain RTN, the number to beat."""
    shift: tuple[torch.Tensor, torch.Tensor] | None
    """``(B, A)`` (float32) of the previous iteration: ``base == loftq_base(W, spec, shift, scaling)``; ``None`` after
    one iteration (``base == Q(W)``). Small, so a checkpoint can rebuild the base instead of storing it."""


@torch.no_grad()
def loftq_base(w: torch.Tensor, spec: WeightQuant, shift: tuple[torch.Tensor, torch.Tensor] | None, scaling: float) -> torch.Tensor:
    """``Q(W − s·BA)`` for ``shift = (B, A)`` (``Q(W)`` for ``None``), computed exactly as ``loftq`` computes its base."""
    work = working(w.detach())
    target = work if shift is None else work - scaling * (shift[0].to(work.dtype) @ shift[1].to(work.dtype))
    return quantize_weight(target, spec).dequant


@torch.no_grad()
def loftq(w: torch.Tensor, spec: WeightQuant, rank: int, scaling: float, iters: int = 1) -> LoftQResult:
    """Alternate quantization and rank-``rank`` SVD of the residual ``iters`` times (float32 or wider)."""
    if iters < 1:
        raise ValueError(f"iters: got {iters}, expected ≥ 1")
    if scaling <= 0:
        raise ValueError(f"scaling: got {scaling}, expected > 0 (lora_alpha / r)")
    work = working(w.detach())
    rank = min(rank, *work.shape)
    rtn = float(torch.linalg.matrix_norm(work - quantize_weight(work, spec).dequant))
    residuals: list[float] = []
    shift = None
    for i in range(iters):
        q = loftq_base(w, spec, shift, scaling)
        U, S, Vh = torch.linalg.svd(work - q, full_matrices=False)
        root = (S[:rank] / scaling).sqrt()
        B, A = U[:, :rank] * root, root[:, None] * Vh[:rank]
        residuals.append(float(torch.linalg.matrix_norm(work - q - scaling * (B @ A))))
        if i < iters - 1:
            shift = (B, A)
    return LoftQResult(q.to(w.dtype), A.to(w.dtype), B.to(w.dtype), residuals, rtn, shift)
