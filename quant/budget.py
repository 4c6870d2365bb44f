"""Per-layer ranks under a bits-per-weight budget (``postpass.budget_bpw``): spend factor bits where they pay.

One rank for every Linear spends bits badly when layers' errors differ by 10x. Given, for each Linear ℓ, its
output-error curve ``e_ℓ(k) = ‖X (E − A_{:k} B_{:k})ᵀ‖²`` for ``k = 0 … K`` (K = ``postpass.rank``, the cap; one
reconstruction at rank K, its components truncated: every reconstructor orders its components by importance)
and the bits one more component costs, ``c_ℓ = 16 (out + in)`` (fp16 factors, as the export stores them), the
budget B bits per quantized weight allows ``B · Σ out·in`` bits in all: the codes and scales (fixed by the
format) plus the factors. Choose ``k_ℓ`` minimising ``Σ e_ℓ(k_ℓ) / n_ℓ`` within it.

Weighting ``n_ℓ`` (``postpass.budget_weighting``): ``absolute`` (n = 1, the default) sums the raw output errors, so
the layers that write most into the residual stream count most; ``relative`` divides each by the layer's own
output energy ``‖X Wᵀ‖²`` (the report's ``rel_output_error``, squared). Measured on SmolLM2 (W4 per-channel, whiten,
benchmarks/budget.py): at 4.5 / 5.0 bits per weight absolute gives ppl 42.03 / 39.89, relative 43.63 / 40.72, the
uniform rank at the same bits 42.35 / 39.61. Neither layer-local error predicts perplexity well: a sensitivity
weighting (the distillation loss's gradient) is the next step.

The curves are *measured* in the output space from the statistics (``output_error_curve``), for any
reconstructor: for whitening SVD they equal the tail of the whitened singular values (tested), for L2QER and
LQER they are the real output error their components leave, not a proxy.

The problem is separable with one linear cost per layer, so the allocator is greedy over each curve's lower
convex hull: hull segments (a jump from rank i to rank j) in order of error removed per bit, a layer's
segments in its own order (their ratios decrease along the hull), a segment that does not fit skipped for the
rest of that layer. This is optimal whenever the budget falls on a segment boundary (the fractional relaxation
is then integral), and within one segment of optimal otherwise; tested against brute force.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from qaft.core.errors import ConfigError

from .fakequant import QuantLinear
from .grid import quantize_weight
from .scheme import WeightQuant

FACTOR_BITS = 16
"""Bits per stored factor element: fp16, as both exports write the adapter."""


@dataclass(frozen=True)
class Curve:
    """One Linear's part of the allocation problem."""

    name: str
    errors: tuple[float, ...]
    """Normalised output error at rank 0 … K (non-increasing in practice; the hull makes the allocator robust if not)."""
    base_bits: int
    """Codes + scales (+ zeros): what the Linear costs at rank 0."""
    bits_per_rank: int
    """One more component's factors: ``FACTOR_BITS · (out + in)``."""
    weights: int
    """``out · in``: what the budget is per."""


def output_error_curve(error: torch.Tensor, a: torch.Tensor, b: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
    """``‖X (E − A_{:k} B_{:k})ᵀ‖²`` for k = 0 … K from ``XᵀX`` alone (float64 ``[K + 1]``): with ``C = XᵀX``,
    ``e(k) = tr(E C Eᵀ) − 2 Σ_{i<k} a_iᵀ E C b_i + Σ_{i,j<k} (a_iᵀ a_j)(b_iᵀ C b_j)``; one ``E C`` product, then prefix sums."""
    e, a, b, c = (t.to(torch.float64) for t in (error, a, b, xtx))
    ec = e @ c  # [out, in]
    cross = (a * (ec @ b.T)).sum(0)  # a_iᵀ E C b_i, [K]
    gram = (a.T @ a) * (b @ c @ b.T)  # (a_iᵀ a_j)(b_iᵀ C b_j), [K, K]
    k = a.shape[1]
    quad = torch.stack([gram[:j, :j].sum() for j in range(k + 1)]) if k else gram.new_zeros(1)
    lin = torch.cat([cross.new_zeros(1), torch.cumsum(cross, 0)])
    return ((ec * e).sum() - 2 * lin + quad).clamp(min=0)


def _bits(codes: int, scales: int, zeros: int, bits: int, out: int, in_: int) -> tuple[int, int, int]:
    return codes * bits + 16 * scales + 16 * zeros, FACTOR_BITS * (out + in_), codes


def stored_bits(m: QuantLinear) -> tuple[int, int, int]:
    """``(base bits, bits per rank, weights)`` of a deployed Linear: codes at the grid's bits, fp16 scales (and
    zeros), fp16 factors of ``out + in`` elements per component."""
    return _bits(m.codes.numel(), m.scale.numel(), 0 if m.zero is None else m.zero.numel(), m.spec.bits, m.out_features, m.in_features)


def model_bpw(model: torch.nn.Module) -> float:
    """Bits per quantized weight of a quantized model as stored: every ``QuantLinear``'s ``stored_bits`` at its rank."""
    parts = [(stored_bits(m), 0 if m.lora_A is None else m.lora_A.shape[0]) for m in model.modules() if isinstance(m, QuantLinear)]
    return sum(base + per * k for (base, per, _), k in parts) / sum(n for (_, _, n), _ in parts)


def shape_bits(out: int, in_: int, spec: WeightQuant) -> tuple[int, int, int]:
    """``stored_bits`` of an ``[out, in]`` Linear on ``spec``'s grid, before any quantization (the doctor's range)."""
    q = quantize_weight(torch.zeros(out, in_), spec)
    return _bits(q.codes.numel(), q.scale.numel(), 0 if q.zero is None else q.zero.numel(), spec.bits, out, in_)


def _hull(errors: tuple[float, ...]) -> list[int]:
    """Ranks on the lower convex hull of ``(k, errors[k])``, from 0 to the best rank."""
    pts: list[int] = []
    for k, y in enumerate(errors):
        while len(pts) >= 2:
            i, j = pts[-2], pts[-1]
            if (errors[j] - errors[i]) * (k - i) >= (y - errors[i]) * (j - i):  # j is not below the chord i → k
                pts.pop()
            else:
                break
        pts.append(k)
    best = min(range(len(errors)), key=lambda k: (errors[k], k))
    return [k for k in pts if k <= best]


def bounds(curves: list[Curve], cap: int | None = None) -> tuple[float, float]:
    """``(min, max)`` bits per weight the budget can take: every layer at rank 0, every layer at the cap."""
    weights = sum(c.weights for c in curves)
    base = sum(c.base_bits for c in curves)
    top = sum(c.base_bits + c.bits_per_rank * (len(c.errors) - 1 if cap is None else cap) for c in curves)
    return base / weights, top / weights


def allocate(curves: list[Curve], budget_bpw: float) -> list[int]:
    """The rank of each Linear (same order as ``curves``) within ``budget_bpw`` bits per quantized weight."""
    low, high = bounds(curves)
    if budget_bpw < low:
        raise ConfigError(
            f"postpass.budget_bpw: {budget_bpw:g} bits per weight is below what the codes and scales alone take, {low:.3f}; "
            f"use at least {low:.3f} (up to {high:.3f} buys every layer rank {len(curves[0].errors) - 1}), or a smaller weight format"
        )
    left = budget_bpw * sum(c.weights for c in curves) - sum(c.base_bits for c in curves)
    ranks = [0] * len(curves)
    hulls = [_hull(c.errors) for c in curves]
    heap: list[tuple[float, int, int]] = []  # (-error removed per bit, layer, index of the segment's end on its hull)

    def push(layer: int, end: int) -> None:
        if end < len(hulls[layer]):
            c, i, j = curves[layer], hulls[layer][end - 1], hulls[layer][end]
            heapq.heappush(heap, (-(c.errors[i] - c.errors[j]) / (c.bits_per_rank * (j - i)), layer, end))

    for layer in range(len(curves)):
        push(layer, 1)
    while heap:
        _, layer, end = heapq.heappop(heap)
        c, i, j = curves[layer], hulls[layer][end - 1], hulls[layer][end]
        cost = c.bits_per_rank * (j - i)
        if cost > left:
            continue  # this layer's later segments need this one: the layer stops here
        left -= cost
        ranks[layer] = j
        push(layer, end + 1)
    return ranks


def spent_bpw(curves: list[Curve], ranks: list[int]) -> float:
    """Bits per quantized weight of an allocation, counted as the budget counts them."""
    return sum(c.base_bits + c.bits_per_rank * k for c, k in zip(curves, ranks)) / sum(c.weights for c in curves)
