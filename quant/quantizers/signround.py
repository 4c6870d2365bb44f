"""SignRound: learned rounding offsets and clipping by signed gradient descent, on qaft's grids.

The method of Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization
of LLMs" (arXiv 2309.05516), which Intel's AutoRound implements.

Each weight is rounded as ``round(w/Δ + V)`` instead of ``round(w/Δ)``, with a learned ``V ∈ [−½, ½]``
per weight, and on int grids each row/group's range is clipped by learned factors ``α`` (of its max)
and ``β`` (of its min) in ``[min_clip, 1]``. Both are trained by signed gradient descent (each step
moves every parameter by ``lr · sign(grad)``, ``lr`` decaying linearly to 0, so ``iters`` steps of
``lr = 1/iters`` can move ``V`` across its whole range, AutoRound's default) on the Linear's output
error on the calibration inputs. The iterate with the lowest error is kept, the start (RTN) included,
so the result is never worse than RTN on that error, and ``iters: 0`` is RTN bit for bit.

Our reading, and why:

- **Objective per Linear, from the shared statistics**: ``‖X (W − Q)ᵀ‖² = tr(E H Eᵀ)`` with
  ``H = XᵀX / n`` (what GPTQ minimises too), instead of AutoRound's decoder-block output on sampled
  mini-batches. It is the exact output error over *all* calibration tokens, costs ``out · in²`` per
  step whatever the token count, needs no activations kept, and fits the quantizer interface every
  reconstructor composes with. What it gives up: interactions between the Linears of one block.
  The inputs are those of the layer-sequential driver (quantized propagation by default), so each
  Linear's rounding sees the errors of the layers below it, as AutoRound's ``enable_quanted_input``.
- **Gradients**: straight-through through ``round``; ``clamp`` passes none outside the grid's range
  (AutoRound's choice), which is what lets ``α < 1`` trade clipping against resolution.
- **Grids**: int (symmetric or asymmetric; per tensor, channel or group): ``V`` and ``α``/``β``. MXINT and
  GGUF Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0: ``V`` only, because their scales follow the format's rule
  (powers of two; llama.cpp re-derives a block's scale from its values), so ``minmax`` is off there and
  refused when asked for. GGUF MXFP4's values are not evenly spaced (no single ``Δ`` to offset by):
  refused.
- The calibration is the post-pass's (``postpass.calibration_samples`` × ``calibration_seq_len``),
  shared with every other method, so there are no separate ``nsamples`` / ``seqlen`` options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from qaft.core.typed import Ge, Le

from .. import ggufgrid
from ..calibrate import LayerStats
from ..grid import QuantizedWeight, grid_params, group_view, pack, round_to_grid
from ..scheme import GGUFType, WeightFormat, WeightQuant
from .base import QUANTIZERS, QuantizationFailed, WeightQuantizer


@dataclass(frozen=True, kw_only=True)
class SignRoundOptions:
    iters: Annotated[int, Ge(0)] = 200
    """Signed-gradient steps per Linear (AutoRound's default; its light setting is 50); 0 = RTN."""
    lr: Annotated[float, Ge(0.0)] | None = None
    """Step size at the start (decays linearly to 0); null = 1 / iters."""
    minmax: bool | None = None
    """Also learn the clipping of each row/group's range; null = where the grid's scales are free (int), off for MXINT / GGUF."""
    min_clip: Annotated[float, Ge(0.0), Le(1.0)] = 0.5
    """Smallest clipping factor of a range (1 = no clipping)."""


def _ste(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y``'s value with ``x``'s gradient (straight-through); exactly ``y`` when no gradient is recorded."""
    return x + (y - x).detach() if torch.is_grad_enabled() else y


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return _ste(x, torch.round(x))


class _Grid:
    """The rounding of one weight as a differentiable function of ``V`` (and ``α``, ``β`` on int grids)."""

    def __init__(self, g: torch.Tensor, spec: WeightQuant, minmax: bool):
        self.g, self.spec, self.minmax = g, spec, minmax
        self.scale, self.zero = grid_params(g, spec)  # RTN's grid: the start, and the fixed grid without minmax
        if spec.gguf_type is not None:
            self.step = ggufgrid.step(g, self.scale, spec.gguf_type)
        else:
            self.step = self.scale.expand_as(g)
        if minmax:
            self.hi = g.abs().amax(-1, keepdim=True) if spec.symmetric else g.amax(-1, keepdim=True).clamp(min=0)
            self.lo = None if spec.symmetric else g.amin(-1, keepdim=True).clamp(max=0)

    def int_grid(self, alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``grid.grid_params``'s int rule on the clipped range; at ``α = β = 1`` exactly RTN's grid."""
        b = self.spec.bits
        if self.spec.symmetric:
            amax = self.hi * alpha
            return torch.where(self.hi > 0, amax / (2 ** (b - 1) - 1), torch.ones_like(amax)), None
        hi, lo = self.hi * alpha, self.lo * beta
        scale = torch.where(self.hi > self.lo, (hi - lo) / (2**b - 1), torch.ones_like(hi))
        return scale, _ste_round(-lo / scale)

    def __call__(self, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(codes, dequantized, scale, zero)``; ``dequantized`` carries gradients to ``v`` (and ``α``, ``β``)."""
        if not self.minmax:  # a fixed grid: round the shifted weight by the format's own rule, straight through
            x = self.g + v * self.step
            codes, deq = round_to_grid(x.detach(), self.scale, self.zero, self.spec)
            return codes, _ste(x, deq), self.scale, self.zero
        b = self.spec.bits
        scale, zero = self.int_grid(alpha, beta)
        if zero is None:
            qmax = 2 ** (b - 1) - 1
            codes = torch.clamp(_ste_round(self.g / scale + v), -qmax, qmax)
            return codes.detach(), codes * scale, scale, None
        codes = torch.clamp(_ste_round(self.g / scale + v) + zero, 0, 2**b - 1)
        return codes.detach(), (codes - zero) * scale, scale, zero


def check_grid(spec: WeightQuant, minmax: bool | None) -> bool:
    """Whether the clipping is learned on ``spec``; a grid the method cannot express raises ``QuantizationFailed``."""
    if spec.gguf_type is GGUFType.MXFP4:
        raise QuantizationFailed(
            "signround cannot offset GGUF MXFP4's unevenly spaced values; it works on int grids, MXINT and GGUF Q4_0, Q4_1, Q5_0, Q5_1, Q8_0"
        )
    free = spec.format is WeightFormat.INT
    if minmax and not free:
        raise QuantizationFailed(
            f"signround's minmax needs scales the format leaves free (int grids); {spec.label}'s scales follow the format's rule: set minmax: false"
        )
    return free if minmax is None else minmax


def signround(w: torch.Tensor, stats: LayerStats, spec: WeightQuant, options: SignRoundOptions = SignRoundOptions()) -> QuantizedWeight:
    """Learned rounding of ``w`` (``[out, in]``) against ``tr(E H Eᵀ)``; same return layout as ``grid.quantize_weight``."""
    minmax = check_grid(spec, options.minmax)
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32  # RTN's working precision
    W = w.detach().to(dtype)
    grid = _Grid(group_view(W, spec), spec, minmax)
    v = torch.zeros_like(grid.g, requires_grad=True)
    clip_shape = grid.scale.shape
    alpha = torch.ones(clip_shape, dtype=dtype, device=W.device, requires_grad=minmax)
    beta = torch.ones(clip_shape, dtype=dtype, device=W.device, requires_grad=minmax and not spec.symmetric)
    params = [p for p in (v, alpha, beta) if p.requires_grad]
    H = stats.covariance.to(device=W.device, dtype=dtype)
    norm = ((W @ H) * W).sum().clamp(min=1e-30)

    def loss() -> torch.Tensor:
        e = W - grid(v, alpha, beta)[1].reshape(W.shape)
        return ((e @ H) * e).sum() / norm

    lr = options.lr if options.lr is not None else 1.0 / max(options.iters, 1)
    best, best_loss = [p.detach().clone() for p in (v, alpha, beta)], float("inf")
    with torch.enable_grad():  # the post-pass driver runs under no_grad
        for i in range(options.iters + 1):  # the start (RTN) is scored first, the last step's result last
            value = loss()
            if value.item() < best_loss:
                best, best_loss = [p.detach().clone() for p in (v, alpha, beta)], value.item()
            if i == options.iters:
                break
            grads = torch.autograd.grad(value, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= lr * (1 - i / options.iters) * g.sign()
                v.clamp_(-0.5, 0.5)
                alpha.clamp_(options.min_clip, 1.0)
                beta.clamp_(options.min_clip, 1.0)
    with torch.no_grad():
        codes, deq, scale, zero = grid(*best)
    return pack(codes, scale, zero, deq, w, spec)


@QUANTIZERS.register
class SignRound(WeightQuantizer):
    name = "signround"
    Options = SignRoundOptions

    def quantize(self, weight: torch.Tensor, stats: LayerStats, spec: WeightQuant) -> QuantizedWeight:
        return signround(weight, stats, spec, self.options)
