"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", 2022).

Quantizes one column at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse of ``H = XᵀX / n`` (the calibration statistics every method
shares), which minimises the layer's output error ``tr((W−Q) H (W−Q)ᵀ)`` column by column:

- damping ``λ = damp · mean(diag H)`` added to the diagonal; dead input channels (``H_jj = 0``) get
  ``H_jj = 1`` and a zero weight column, as in the reference code;
- the upper Cholesky factor of ``H⁻¹`` drives the updates; lazy batches of ``block`` columns (rounded
  to a multiple of the group size) update the rest of the matrix once per block;
- ``act_order`` quantizes columns by decreasing ``H_jj``; with groups, the grids are then fixed up
  front from the original weights ("static groups"), so every group keeps its scale in the order RTN
  stores it; without act-order a group's grid is set from the updated weights when GPTQ reaches it.

The grid and rounding are RTN's (``rtn.grid_params`` / ``rtn.round_to_grid``), so codes, scales and
zero points have exactly RTN's layout and the export packs GPTQ output unchanged. With ``H = I`` and
no damping every error update is zero and GPTQ equals RTN exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from qaft.core.typed import Ge

from ..calibrate import LayerStats
from ..grid import QuantizedWeight, grid_params, group_view, pack, round_to_grid, working
from ..scheme import Granularity, WeightFormat, WeightQuant
from .base import QUANTIZERS, QuantizationFailed, WeightQuantizer


class SingularHessian(QuantizationFailed):
    """``H`` is not positive definite even after damping."""


@dataclass(frozen=True, kw_only=True)
class GPTQOptions:
    damp: Annotated[float, Ge(0.0)] = 0.01
    """Added to H's diagonal as a share of its mean."""
    block_size: Annotated[int, Ge(1)] = 128
    """Columns per lazy update batch (rounded to a multiple of the group size)."""
    act_order: bool = False
    """Quantize columns by decreasing H_jj (groups then use static grids from the original weights)."""


def _group_size(spec: WeightQuant, cols: int) -> int | None:
    if spec.format is WeightFormat.MXINT or spec.granularity is Granularity.GROUP:
        return spec.group_size
    return None


def gptq(w: torch.Tensor, stats: LayerStats, spec: WeightQuant, settings: GPTQOptions = GPTQOptions()) -> QuantizedWeight:
    """GPTQ-quantize ``w`` (``[out, in]``) with the input statistics of its layer; same return layout as ``rtn.quantize_weight``."""
    if stats.n_tokens == 0:
        raise SingularHessian("no calibration tokens reached this layer; calibrate on more tokens")
    out, cols = w.shape
    W = working(w.detach()).clone()  # RTN's working precision: H = I gives RTN bit for bit
    H = stats.covariance.to(device=W.device, dtype=torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    gs = _group_size(spec, cols)
    perm = torch.argsort(H.diagonal(), descending=True) if settings.act_order else torch.arange(cols, device=W.device)
    inv = torch.argsort(perm)

    # grids: per tensor / channel from the whole (original) weight; per group now (static) or on arrival (dynamic)
    static = gs is None or settings.act_order
    if static:
        g = group_view(W, spec)  # [rows, n_groups, group]
        scale_g, zero_g = grid_params(g, spec)
    else:
        n_groups = cols // gs
        scale_g = W.new_zeros(out, n_groups, 1)
        zero_g = None if (spec.symmetric or spec.format is WeightFormat.MXINT) else W.new_zeros(out, n_groups, 1)

    def column_grid(j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero of original column ``j``: ``[out]``, or ``[1]`` per tensor."""
        k = 0 if gs is None else j // gs
        return scale_g[:, k, 0], None if zero_g is None else zero_g[:, k, 0]

    W = W[:, perm]
    H = H[perm][:, perm]
    H += settings.damp * H.diagonal().mean() * torch.eye(cols, dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise SingularHessian(
            f"H + {settings.damp:g}·mean(diag)·I is not positive definite; raise postpass.quantizer.damp (e.g. 0.1) or calibrate on more tokens"
        )
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(W.dtype)  # factorised in float64, applied in W's precision

    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    block = settings.block_size if gs is None else max(gs, (settings.block_size // gs) * gs)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(out, i2 - i1, dtype=W.dtype, device=W.device), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = int(perm[i1 + i])
            if not static and j % gs == 0:  # first column of a group (no act-order: columns arrive in order)
                s, z = grid_params(W1[:, i : i + gs], spec)
                scale_g[:, j // gs] = s
                if zero_g is not None:
                    zero_g[:, j // gs] = z
            s, z = column_grid(j)
            c, q = round_to_grid(W1[:, i], s, z, spec)
            Q[:, i1 + i], codes[:, i1 + i] = q, c
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return pack(codes[:, inv], scale_g, zero_g, Q[:, inv], w, spec)


@QUANTIZERS.register
class GPTQ(WeightQuantizer):
    name = "gptq"
    Options = GPTQOptions

    def quantize(self, weight: torch.Tensor, stats: LayerStats, spec: WeightQuant) -> QuantizedWeight:
        return gptq(weight, stats, spec, self.options)
