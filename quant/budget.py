"""Per-layer ranks under a bits-per-weight budget (``postpass.budget_bpw``): spend factor bits where they pay.

One rank for every Linear spends bits badly when layers' errors differ by 10x. Given, for each Linear ℓ, its
output-error curve ``e_ℓ(k) = ‖X (E − A_{:k} B_{:k})ᵀ‖²`` for ``k = 0 … K`` (K = ``postpass.rank``, the cap; one
reconstruction at rank K, its components truncated: every reconstructor orders its components by importance)
and the bits one more component costs, ``c_ℓ = 16 (out + in)`` (fp16 factors, as the export stores them), the
budget B bits per quantized weight allows ``B · Σ out·in`` bits in all: the codes and scales (fixed by the
format) plus the factors. Choose ``k_ℓ`` minimising ``Σ e_ℓ(k_ℓ) / n_ℓ`` within it.

Weighting ``n_ℓ`` (``postpass.budget_weighting``): ``absolute`` (n = 1, the default) sums the raw output errors, so
the layers that write most into the residual stream count most; ``relative`` divides each by the layer's own
output energy ``‖X Wᵀ‖²`` (the report's ``rel_output_error``, squared); ``fisher`` multiplies each by the layer's
sensitivity (``sensitivity.py``: the mean squared loss gradient at its output), the loss the error costs to
second order. Measured on SmolLM2 (W4 per-channel, whiten, benchmarks/budget.py): at 4.5 / 5.0 bits per weight
fisher gives ppl 41.94 / 38.91, absolute 41.99 / 39.89, relative 43.63 / 40.70, the uniform rank at the same bits
42.36 / 39.54. Ranks alone move little; a choice of format per Linear is where the weighting decides.

The curves are *measured* in the output space from the statistics (``output_error_curve``), for any
reconstructor: for whitening SVD they equal the tail of the whitened singular values (tested), for L2QER and
LQER they are the real output error their components leave, not a proxy.

The problem is separable, so the allocator is greedy over each Linear's lower convex hull in (bits, error):
its points are every (format, rank) of its menu (one format: the ranks), hull segments (a jump from one point
to another, e.g. rank 1 → 3, or 4-bit rank 2 → 8-bit rank 0) taken in order of error removed per bit, a
Linear's segments in its own order (their ratios decrease along the hull), a segment that does not fit
skipped for the rest of that Linear. This solves the LP relaxation of the multiple-choice knapsack, so it is
optimal whenever the budget falls on a segment boundary (the relaxation is then integral) and within one
segment of optimal otherwise; tested against brute force, with formats and without, on hand cases (a segment too dear
for the bits left skips only its own Linear; segments bought by gain per bit, not by gain), and for maximality: no
Linear's next hull segment fits in the bits left unspent.
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
"""Bits per stored factor element: fp16, as qaft's folder and both exports store them (``QuantLinear.factors_to_fp16``)."""


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


def _bits(codes: int, scales: int, zeros: int, spec: WeightQuant, out: int, in_: int) -> tuple[int, int, int]:
    return codes * spec.bits + spec.scale_bits * scales + 16 * zeros, FACTOR_BITS * (out + in_), codes


def stored_bits(m: QuantLinear) -> tuple[int, int, int]:
    """``(base bits, bits per rank, weights)`` of a deployed Linear: codes at the grid's bits, scales at their stored
    width (fp16; E8M0 for MX blocks) and fp16 zeros, fp16 factors of ``out + in`` elements per component."""
    return _bits(m.codes.numel(), m.scale.numel(), 0 if m.zero is None else m.zero.numel(), m.spec, m.out_features, m.in_features)


def model_bpw(model: torch.nn.Module) -> float:
    """Bits per quantized weight of a quantized model as stored: every ``QuantLinear``'s ``stored_bits`` at its rank."""
    parts = [(stored_bits(m), 0 if m.lora_A is None else m.lora_A.shape[0]) for m in model.modules() if isinstance(m, QuantLinear)]
    return sum(base + per * k for (base, per, _), k in parts) / sum(n for (_, _, n), _ in parts)


def shape_bits(out: int, in_: int, spec: WeightQuant) -> tuple[int, int, int]:
    """``stored_bits`` of an ``[out, in]`` Linear on ``spec``'s grid, before any quantization (the doctor's range)."""
    q = quantize_weight(torch.zeros(out, in_), spec)
    return _bits(q.codes.numel(), q.scale.numel(), 0 if q.zero is None else q.zero.numel(), spec, out, in_)


def _hull(points: list[tuple[int, float]]) -> list[int]:
    """Indices of ``points`` (``(bits, error)``) on their lower convex hull, from the cheapest point (the least error
    among the cheapest) along strictly falling error: every option worth buying, in the order one buys them."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    hull: list[int] = []
    for i in order:
        b, e = points[i]
        if hull and (b == points[hull[-1]][0] or e >= points[hull[-1]][1]):
            continue  # no cheaper than the last, or no better
        while len(hull) >= 2:
            (b1, e1), (b2, e2) = points[hull[-2]], points[hull[-1]]
            if (e2 - e1) * (b - b1) >= (e - e1) * (b2 - b1):  # the last is not below the chord to this one
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _options(curves: list[Curve]) -> list[tuple[int, int]]:
    """Every ``(curve, rank)`` of one Linear's menu."""
    return [(f, k) for f, c in enumerate(curves) for k in range(len(c.errors))]


def bounds(layers: list[list[Curve]], cap: int | None = None) -> tuple[float, float]:
    """``(min, max)`` bits per weight the budget can take: every Linear at its cheapest option at rank 0, every one at
    its dearest at the cap (``cap`` None: each curve's last rank). ``layers``: each Linear's menu of curves."""
    weights = sum(menu[0].weights for menu in layers)
    low = sum(min(c.base_bits for c in menu) for menu in layers)
    high = sum(max(c.base_bits + c.bits_per_rank * (len(c.errors) - 1 if cap is None else cap) for c in menu) for menu in layers)
    return low / weights, high / weights


def allocate(layers: list[list[Curve]], budget_bpw: float) -> list[tuple[int, int]]:
    """``(index into its menu, rank)`` of each Linear within ``budget_bpw`` bits per quantized weight, minimising the
    summed error. ``layers[i]``: Linear i's menu, one ``Curve`` per weight format it may take (one for a fixed format)."""
    low, high = bounds(layers)
    if budget_bpw < low:
        cap = max(len(c.errors) - 1 for menu in layers for c in menu)
        raise ConfigError(
            f"postpass.budget_bpw: {budget_bpw:g} bits per weight is below what the codes and scales alone take, {low:.3f}; "
            f"use at least {low:.3f} (up to {high:.3f} buys every layer rank {cap}), or a smaller weight format"
        )
    options = [_options(menu) for menu in layers]
    points = [[(menu[f].base_bits + menu[f].bits_per_rank * k, menu[f].errors[k]) for f, k in opts] for menu, opts in zip(layers, options)]
    hulls = [_hull(p) for p in points]
    left = budget_bpw * sum(menu[0].weights for menu in layers) - sum(p[h[0]][0] for p, h in zip(points, hulls))
    at = [0] * len(layers)  # each Linear's position on its hull
    heap: list[tuple[float, int, int]] = []  # (-error removed per bit, layer, index of the segment's end on its hull)

    def push(layer: int, end: int) -> None:
        if end < len(hulls[layer]):
            (b1, e1), (b2, e2) = (points[layer][hulls[layer][j]] for j in (end - 1, end))
            heapq.heappush(heap, (-(e1 - e2) / (b2 - b1), layer, end))

    for layer in range(len(layers)):
        push(layer, 1)
    while heap:
        _, layer, end = heapq.heappop(heap)
        cost = points[layer][hulls[layer][end]][0] - points[layer][hulls[layer][end - 1]][0]
        if cost > left:
            continue  # this layer's later segments need this one: the layer stops here
        left -= cost
        at[layer] = end
        push(layer, end + 1)
    return [options[i][hulls[i][at[i]]] for i in range(len(layers))]


def spent_bpw(layers: list[list[Curve]], choices: list[tuple[int, int]]) -> float:
    """Bits per quantized weight of an allocation (``allocate``'s choices), counted as the budget counts them."""
    bits = sum(menu[f].base_bits + menu[f].bits_per_rank * k for menu, (f, k) in zip(layers, choices))
    return bits / sum(menu[0].weights for menu in layers)
