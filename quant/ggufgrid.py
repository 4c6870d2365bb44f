"""llama.cpp's GGUF block grids in torch, bit-exact with the ``gguf`` package's reference quantizers.

Why our own copy: training (fake quant, NPFT's ``quant_step`` noise, QAT), GPTQ and the low-rank
post-pass need the grid as differentiable-free torch ops on ``[..., 32]`` blocks, and GPTQ must round
single columns on a grid fixed earlier. ``gguf.quants`` (which mirrors ggml-quants.c) stays the
reference: ``tests/test_ggufgrid.py`` checks our codes and values against it bit for bit.

Every type has two scales, and the difference matters for bit-exactness: codes are computed with
the float32 ``d`` (and block minimum ``m``), the file stores ``fp16(d)`` (``fp16(m)``), and the value a
reader sees is computed from the stored ones. ``grid`` returns the float32 rounding grid;
``round_block`` returns codes and the *stored-grid* values; ``stored`` converts a grid for storage.

- ``Q4_0`` / ``Q5_0``: ``d = w_max / −8`` (``−16``), ``w_max`` the signed weight of largest magnitude, so
  that weight is the code −8 (−16) exactly; ``code = trunc(w/d + 8.5) − 8``, clamped to [−8, 7].
- ``Q4_1`` / ``Q5_1``: ``d = (max − min)/15`` (31), ``code = trunc((w − min)/d + 0.5)`` in [0, 15] (31);
  value ``fp16(d)·code + fp16(min)``: the ``zero`` of a ``QuantizedWeight`` is this float minimum.
- ``Q8_0``: ``d = max|w|/127``, ``code = round_half_away(w/d)``.
- ``MXFP4``: ``d = 2^(⌊log2 max|w|⌋ − 3)`` (the E8M0 scale, halved so that the codes are the *doubled*
  E2M1 values 0, ±1, ±2, ±3, ±4, ±6, ±8, ±12); code = the nearest value, ties to the smaller magnitude.
  Blocks whose max is below 2⁻¹²⁵ (E8M0 underflow) are outside what we match.
"""

from __future__ import annotations

import torch

from .scheme import GGUFType

MXFP4_CODES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
"""The doubled E2M1 values in llama.cpp's nibble order (index = nibble)."""

CODE_RANGE = {
    GGUFType.Q4_0: (-8, 7),
    GGUFType.Q5_0: (-16, 15),
    GGUFType.Q4_1: (0, 15),
    GGUFType.Q5_1: (0, 31),
    GGUFType.Q8_0: (-127, 127),
    GGUFType.MXFP4: (-12, 12),
}
"""Smallest and largest code of each type in our convention (MXFP4: doubled E2M1 values)."""

_SIGNED_HALF = {GGUFType.Q4_0: 8, GGUFType.Q5_0: 16}
_LEVELS = {GGUFType.Q4_1: 15, GGUFType.Q5_1: 31}


def _recip(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(t.dtype)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """``gguf.quants.np_roundf``: floor(a) + floor(2·(a − floor(a))) avoids the a + 0.5 rounding slip."""
    a = v.abs()
    f = torch.floor(a)
    return torch.sign(v) * (f + torch.floor(2 * (a - f)))


def grid(g: torch.Tensor, t: GGUFType) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 rounding grid ``(d, min or None)`` of each block of ``g`` (``[..., 32]``), shaped ``[..., 1]``."""
    g = g.float()
    if t in _SIGNED_HALF:
        signed_max = torch.gather(g, -1, g.abs().argmax(-1, keepdim=True))
        return signed_max / -_SIGNED_HALF[t], None
    if t in _LEVELS:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        return (hi - lo) / _LEVELS[t], lo
    amax = g.abs().amax(-1, keepdim=True)
    if t is GGUFType.Q8_0:
        return amax / 127, None
    exp = torch.where(amax > 0, torch.floor(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax)))), torch.full_like(amax, -125.0))
    return torch.exp2(exp - 3), None  # MXFP4; an all-zero block gets E8M0 byte 0, i.e. d = 2^-128


def round_block(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, t: GGUFType) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, values)`` of ``x`` on the grid ``(d, m)`` from ``grid`` (broadcasting); values use the stored fp16 grid.
    Computed in float32 whatever the inputs' dtype, as llama.cpp does."""
    x, d, m = x.float(), d.float(), None if m is None else m.float()
    if t is GGUFType.MXFP4:
        levels = torch.tensor(MXFP4_CODES, dtype=torch.float32, device=x.device)
        nibble = (d.unsqueeze(-1) * levels - x.unsqueeze(-1)).abs().argmin(-1)  # first minimum: ties → smaller magnitude
        codes = levels[nibble]
        return codes, codes * d
    inv = _recip(d)
    if t in _SIGNED_HALF:
        h = _SIGNED_HALF[t]
        codes = torch.clamp(torch.trunc(x * inv + (h + 0.5)), 0, 2 * h - 1) - h
        return codes, _fp16(d) * codes
    if t in _LEVELS:
        codes = torch.clamp(torch.trunc((x - m) * inv + 0.5), 0, _LEVELS[t])
        return codes, _fp16(d) * codes + _fp16(m)
    codes = torch.clamp(_round_half_away(x * inv), -127, 127)  # Q8_0
    return codes, _fp16(d) * codes


def stored(d: torch.Tensor, m: torch.Tensor | None, t: GGUFType) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The grid as the file stores it: fp16-rounded ``d`` and minimum (MXFP4's power of two is exact)."""
    if t is GGUFType.MXFP4:
        return d, None
    return _fp16(d), None if m is None else _fp16(m)


def dequantize(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Values from codes and a *stored* grid (broadcasting): ``d·code (+ m)``, as llama.cpp reads them."""
    values = d * codes.to(d.dtype)
    return values if m is None else values + m


def step(w: torch.Tensor, d: torch.Tensor, t: GGUFType) -> torch.Tensor:
    """Distance between the grid points around each weight (``[..., 32]``, stored ``d`` broadcast):
    uniform ``|d|`` except MXFP4, whose E2M1 spacing doubles at 4 and 8 (doubled units)."""
    d = d.abs()
    if t is not GGUFType.MXFP4:
        return d.expand_as(w).clone()
    r = w.abs() / torch.where(d > 0, d, torch.ones_like(d))
    return d * torch.where(r < 4, 1.0, torch.where(r < 8, 2.0, 4.0))
