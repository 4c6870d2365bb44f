"""Round-to-nearest weight quantization (int and MXINT) and dynamic activation fake quantization.

Pure functions on tensors, no model access. Weights are ``[out, in]``; a group or MX block spans
``group_size`` consecutive input channels of one row.

- int, symmetric: ``scale = max|w| / (2^(b-1) - 1)``, codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``
  (the grid is symmetric around 0, as in the protocol's "W4 symmetric": int4 uses -7..7).
- int, symmetric, ``full_range``: ``scale = w_peak / −2^(b-1)`` with ``w_peak`` the signed weight of largest
  magnitude, codes in ``[-2^(b-1), 2^(b-1)-1]`` (llama.cpp Q4_0's rule on any scope): the peak is exact, the
  steps 7/8 of the ±7 grid's at 4 bits, and the scale may be negative (the opposite extreme can clip by one step).
- int, asymmetric (min–max): ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min / scale)``,
  codes in ``[0, 2^b - 1]``.
- int scales are stored in fp16 (the bits budget counts 16 bits each), and so that every loader rebuilds the same
  weights, each is rounded to an fp16 value short enough that every ``(code − zero) · scale`` is exact in fp16
  (``stored_scale``): compressed-tensors de-quantizes in the scales' dtype when it reads its files (fp16 products)
  and in float32 once transformers has upcast them (its compressed route); exact products make both equal, bit for
  bit, to qaft's. At 4 bits a scale keeps 8 of fp16's 11 significant bits (it moves by < 0.4 %), at 8 bits 4. It
  is rounded to the nearest such value, or up where the nearest would push the extreme weight past the last code
  (so every weight stays within half a step; measured against rounding up always and float32 scales:
  ``benchmarks/scale_rounding.py``).
- mxint (OCP microscaling, integer elements): each block shares ``X = 2^floor(log2 max|w|)``; elements
  are b-bit two's complement fixed point with ``b-2`` fractional bits, so
  ``w ≈ X · code / 2^(b-2)``, codes in ``[-2^(b-1), 2^(b-1) - 1]``.

- gguf (llama.cpp's Q4_0 … Q8_0, MXFP4 on blocks of 32): the rules live in ``ggufgrid``; a
  ``QuantizedWeight`` holds the fp16 grid the file stores, and for ``Q4_1``/``Q5_1`` its ``zero`` is the
  float block minimum added after scaling (``value = scale·code + zero``), not an integer zero point.

``quant_step`` gives Δ, the distance between neighbouring grid points for each weight (NPFT draws
noise of that size); the RTN error of every weight is at most Δ/2 (GGUF's ``_0`` types clip the top
code, llama.cpp's choice: a weight of the opposite sign to the block's extreme can err by up to Δ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ggufgrid
from .scheme import ActGranularity, ActQuant, Granularity, WeightFormat, WeightQuant


@dataclass(frozen=True)
class QuantizedWeight:
    codes: torch.Tensor
    """``[out, in]`` integer codes (int16, enough for 8 bits)."""
    scale: torch.Tensor
    """``[out, n_groups]`` float: Δ of each row/group (per-tensor and per-channel are 1 or few groups)."""
    zero: torch.Tensor | None
    """``[out, n_groups]`` integer zero points (int asymmetric), or GGUF ``_1`` types' float block minimum."""
    dequant: torch.Tensor
    """``[out, in]`` the float weight the codes represent."""


def group_view(w: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """View ``w`` as ``[out, n_groups, group]`` for the scheme's scope of one scale."""
    out, inp = w.shape
    if spec.format is WeightFormat.MXINT or spec.granularity is Granularity.GROUP:
        if inp % spec.group_size:
            raise ValueError(f"input width {inp} is not divisible by group_size {spec.group_size}")
        return w.reshape(out, inp // spec.group_size, spec.group_size)
    if spec.granularity is Granularity.CHANNEL:
        return w.reshape(out, 1, inp)
    return w.reshape(1, 1, out * inp)  # tensor


def grid_params(g: torch.Tensor, spec: WeightQuant) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of each group of ``g`` (``[..., group]``), shaped ``[..., 1]``: the grid RTN rounds to."""
    b = spec.bits
    if spec.gguf_type is not None:
        return ggufgrid.grid(g, spec.gguf_type)
    if spec.format is WeightFormat.MXINT:
        amax = g.abs().amax(-1, keepdim=True)
        exp = torch.floor(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax))))
        return torch.exp2(exp - (b - 2)), None
    if spec.symmetric:
        return symmetric_scale(symmetric_peak(g, spec), spec), None
    lo = g.amin(-1, keepdim=True).clamp(max=0)
    hi = g.amax(-1, keepdim=True).clamp(min=0)  # keep 0 exactly representable
    scale = asymmetric_scale(hi - lo, hi > lo, spec)
    return scale, torch.round(-lo / scale)


FP16_BITS = 11
"""Significant bits of an fp16 value (10 stored + the implicit one)."""
FP16_TINY_EXP = -24
"""log2 of fp16's smallest positive (subnormal) value: every fp16 value is a multiple of it."""


def significant_bits(spec: WeightQuant) -> int:
    """Significant bits an int grid's stored scale keeps: fp16's 11 less those of the largest ``|code − zero|``
    (``2^b − 1`` asymmetric: b bits; ``2^(b-1) − 1`` or ``2^(b-1)`` symmetric: b − 1), so every product is exact."""
    return FP16_BITS - (spec.bits if not spec.symmetric else spec.bits - 1)


def extreme_code(spec: WeightQuant) -> int:
    """The ``|code − zero|`` a raw int scale puts the range's extreme on: ``2^(b-1) − 1``, ``2^(b-1)`` (full range),
    ``2^b − 1`` (asymmetric: the whole range)."""
    if not spec.symmetric:
        return 2**spec.bits - 1
    return 2 ** (spec.bits - 1) if spec.full_range else 2 ** (spec.bits - 1) - 1


def kept_ulp(mag: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """The value of the last bit a stored scale of magnitude ``mag`` (> 0) keeps: ``significant_bits(spec)`` below
    its leading bit, never below fp16's smallest step 2^-24."""
    top = torch.frexp(mag).exponent - 1  # mag in [2^top, 2^(top+1)), exactly (log2 can round up near a power of two)
    return torch.exp2((top - (significant_bits(spec) - 1)).clamp(min=FP16_TINY_EXP).to(mag.dtype))


def stored_scale(scale: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """An int grid's scale as stored (see the module docstring): its magnitude rounded to ``significant_bits(spec)``
    significant bits on fp16's grid (a multiple of 2^-24, at least that) — to the nearest, or up where the nearest
    is so much smaller that the extreme weight would round past the last code (asymmetric grids: any smaller, as
    their zero point's rounding can already use the last half step) — sign kept, in ``scale``'s dtype.
    The gradient passes straight through (learned rounding and ``qaft tune`` train the scale the files hold)."""
    mag = scale.detach().abs().clamp(min=2.0**FP16_TINY_EXP)
    ulp = kept_ulp(mag, spec)
    near, up = torch.round(mag / ulp) * ulp, torch.ceil(mag / ulp) * ulp
    k, slack = extreme_code(spec), 0.5 if spec.symmetric else 0.0  # asymmetric: the zero point's rounding may take the half step
    rounded = torch.where(near * (k + slack) >= mag * k, near, up).copysign(scale)  # extreme / near ≤ k + slack: no clipping
    return scale + (rounded - scale).detach()


def symmetric_peak(g: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """What a symmetric int scale is made from, ``[..., 1]``: ``max|w|``, or with ``full_range`` the signed weight of largest magnitude."""
    if spec.full_range:
        return torch.gather(g, -1, g.abs().argmax(-1, keepdim=True))
    return g.abs().amax(-1, keepdim=True)


def symmetric_scale(peak: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """The symmetric int scale that puts ``peak`` (from ``symmetric_peak``, possibly clipped) on the extreme code; 1 where it is 0."""
    top = -(2 ** (spec.bits - 1)) if spec.full_range else 2 ** (spec.bits - 1) - 1
    return stored_scale(torch.where(peak != 0, peak / top, torch.ones_like(peak)), spec)


def asymmetric_scale(span: torch.Tensor, nonempty: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """The min–max int scale that spreads ``span`` (max − min, possibly clipped) over the ``2^b − 1`` steps, stored;
    1 where ``nonempty`` is false (a group with no range)."""
    return stored_scale(torch.where(nonempty, span / (2**spec.bits - 1), torch.ones_like(span)), spec)


def int_code_range(spec: WeightQuant) -> tuple[int, int]:
    """Smallest and largest code of an int or MXINT grid: ``±(2^(b-1)-1)``, ``[-2^(b-1), 2^(b-1)-1]`` (full range, and
    MXINT's two's-complement elements) or ``[0, 2^b-1]``."""
    b = spec.bits
    if not spec.symmetric:
        return 0, 2**b - 1
    full = spec.full_range or spec.format is WeightFormat.MXINT
    return -(2 ** (b - 1)) if full else -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1


def round_to_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: WeightQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, dequantized)`` of ``x`` on a given grid (broadcasting ``scale``/``zero``): RTN's rounding rule, shared with GPTQ."""
    if spec.gguf_type is not None:
        return ggufgrid.round_block(x, scale, zero, spec.gguf_type)
    lo, hi = int_code_range(spec)
    if zero is None:
        codes = torch.clamp(torch.round(x / scale), lo, hi)
        return codes, codes * scale
    codes = torch.clamp(torch.round(x / scale) + zero, lo, hi)
    return codes, (codes - zero) * scale


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, deq: torch.Tensor, like: torch.Tensor, spec: WeightQuant) -> QuantizedWeight:
    """Grouped ``[rows, n_groups, group]`` results on the rounding grid → a ``QuantizedWeight`` (stored grid) in ``like``'s shape and dtype."""
    if spec.gguf_type is not None:
        scale, zero = ggufgrid.stored(scale, zero, spec.gguf_type)
    shape = like.shape
    rows = shape[0] if scale.shape[0] == shape[0] else 1
    flat = lambda t: t.reshape(rows, -1)  # noqa: E731  [rows, n_groups]
    return QuantizedWeight(
        codes=codes.reshape(shape).to(torch.int16),
        scale=flat(scale).to(like.dtype),
        zero=None if zero is None else flat(zero).to(like.dtype if spec.gguf_type is not None else torch.int16),
        dequant=deq.reshape(shape).to(like.dtype),
    )


def working(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision quantization works in: float32, or float64 when it already is (gradients flow). A float64
    model is how tests compare two computations of one quantity without float32's kernel-dependent last bits."""
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def quantize_weight(w: torch.Tensor, spec: WeightQuant) -> QuantizedWeight:
    """RTN-quantize ``w`` (``[out, in]``) under ``spec``; computed in float32 or wider, returned in ``w``'s dtype."""
    work = working(w.detach())
    g = group_view(work, spec)
    scale, zero = grid_params(g, spec)
    codes, deq = round_to_grid(g, scale, zero, spec)
    return pack(codes, scale, zero, deq, w, spec)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: WeightQuant) -> torch.Tensor:
    """Inverse of ``quantize_weight``'s storage: codes (``[out, in]``) + scale/zero (``[rows, n_groups]``) → float ``[out, in]``."""
    out, inp = codes.shape
    n_groups = scale.shape[1]
    g = codes.to(scale.dtype).reshape(scale.shape[0], n_groups, -1)
    if spec.gguf_type is not None:
        return ggufgrid.dequantize(g, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)).reshape(out, inp)
    z = 0 if zero is None else zero.to(scale.dtype).unsqueeze(-1)
    if spec.format is WeightFormat.INT:  # a scale being trained (``qaft tune``) moves off the stored grid between steps
        scale = stored_scale(scale, spec)
    return ((g - z) * scale.unsqueeze(-1)).reshape(out, inp)


def quant_step(w: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """Δ for every weight, ``[out, in]``: the RTN grid spacing in that weight's row/group."""
    q = quantize_weight(w, spec)
    g = group_view(w, spec)
    scale = q.scale.reshape(g.shape[0], g.shape[1], 1)
    if spec.gguf_type is not None:
        return ggufgrid.step(g, scale, spec.gguf_type).reshape(w.shape).to(w.dtype)
    return scale.abs().expand_as(g).reshape(w.shape)  # a full-range scale carries a sign


def fake_quant_activation(x: torch.Tensor, spec: ActQuant) -> torch.Tensor:
    """Dynamic symmetric fake quantization of ``x`` (``[..., in]``): one scale per token or per tensor."""
    if spec.bits is None:
        return x
    qmax = 2 ** (spec.bits - 1) - 1
    amax = x.abs().amax(-1, keepdim=True) if spec.granularity is ActGranularity.TOKEN else x.abs().amax()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale
