"""RTN and MXINT: codes in range, error within Δ/2, exact grids, round trips."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qaft.quant.grid import dequantize, fake_quant_activation, quant_step, quantize_weight
from qaft.quant.scheme import ActGranularity, ActQuant, Granularity, WeightFormat, WeightQuant

SPECS = [
    WeightQuant(bits=4, granularity=Granularity.CHANNEL),
    WeightQuant(bits=3, granularity=Granularity.GROUP, group_size=16),
    WeightQuant(bits=4, symmetric=False, granularity=Granularity.CHANNEL),
    WeightQuant(bits=2, symmetric=False, granularity=Granularity.GROUP, group_size=8),
    WeightQuant(bits=8, granularity=Granularity.TENSOR),
    WeightQuant(bits=4, format=WeightFormat.MXINT, granularity=Granularity.GROUP, group_size=16),
    WeightQuant(bits=8, format=WeightFormat.MXINT, granularity=Granularity.GROUP, group_size=32),
    WeightQuant(bits=4, granularity=Granularity.CHANNEL, full_range=True),
    WeightQuant(bits=3, granularity=Granularity.GROUP, group_size=16, full_range=True),
]


def code_range(spec: WeightQuant) -> tuple[int, int]:
    b = spec.bits
    if spec.format is WeightFormat.MXINT or spec.full_range:
        return -(2 ** (b - 1)), 2 ** (b - 1) - 1
    return (-(2 ** (b - 1) - 1), 2 ** (b - 1) - 1) if spec.symmetric else (0, 2**b - 1)


@settings(max_examples=60, deadline=None)
@given(spec=st.sampled_from(SPECS), seed=st.integers(0, 2**16), scale=st.floats(1e-4, 1e3), outlier=st.booleans())
@example(spec=SPECS[7], seed=2852, scale=793.0, outlier=False)  # the opposite side clips just past one stored step
def test_codes_in_range_and_error_within_half_a_step(spec, seed, scale, outlier):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 64, generator=g) * scale
    if outlier:
        w[3, 5] *= 50
    q = quantize_weight(w, spec)
    lo, hi = code_range(spec)
    assert q.codes.min() >= lo and q.codes.max() <= hi
    delta = quant_step(w, spec)
    err = (w - q.dequant).abs()
    raw = expected_step(w, spec)  # the smallest grid that covers the range
    if spec.format is WeightFormat.MXINT or spec.full_range:  # the top of the range can clip (full range: the side opposite the peak)
        assert (err <= delta / 2 + 1e-6 * scale).float().mean() > 0.95  # worst of 3000 seeds: 0.961 (3-bit groups of 16)
        # A weight opposite the peak is at most |peak| = 2^(b-1)·raw and clips to code 2^(b-1) − 1 times the stored step,
        # which the fp16 rounding may have made a little smaller than raw: just over one step (seed 2852, scale 793: 1.0014)
        top = 2 ** (spec.bits - 1)
        clip = delta if spec.format is WeightFormat.MXINT else torch.maximum(delta / 2, top * raw - (top - 1) * delta)
        assert (err <= clip * (1 + 1e-5) + 1e-6 * scale).all()
    else:
        assert (err <= delta / 2 * (1 + 1e-5) + 1e-12).all()
    if spec.format is WeightFormat.MXINT:
        torch.testing.assert_close(delta, raw, rtol=1e-6, atol=0)
    else:  # rounded to the stored fp16 scale: within one unit of its last kept bit, and never so small that it clips
        kept = 11 - (spec.bits if not spec.symmetric else spec.bits - 1)
        k = (2 ** (spec.bits - 1) if spec.full_range else 2 ** (spec.bits - 1) - 1) if spec.symmetric else 2**spec.bits - 1
        slack = 0.5 if spec.symmetric else 0.0  # asymmetric: never smaller (its zero point rounds too)
        assert (delta * (k + slack) >= raw * k * (1 - 1e-7)).all() and (delta <= raw * (1 + 2.0 ** (1 - kept))).all()
        assert_stored_in_fp16_with_exact_products(q, spec)


def assert_stored_in_fp16_with_exact_products(q, spec: WeightQuant) -> None:
    """Each scale is an fp16 value, and every weight the codes stand for is computed the same in fp16 (as
    compressed-tensors de-quantizes its files) as in float32 (as transformers' compressed route does); weights
    beyond fp16's range (65504) have no fp16 form to compare."""
    if q.dequant.abs().max() > torch.finfo(torch.float16).max:
        return
    assert torch.equal(q.scale.half().float(), q.scale)
    g = q.codes.float().reshape(q.scale.shape[0], q.scale.shape[1], -1)
    z = 0 if q.zero is None else q.zero.float().unsqueeze(-1)
    half = ((g - z).half() * q.scale.half().unsqueeze(-1)).float().reshape(q.dequant.shape)
    assert torch.equal(half, q.dequant)


def expected_step(w: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """Δ from the definitions, written independently of the grid code: an oversized scale cannot pass."""
    rows, cols = w.shape
    size = cols if spec.granularity is Granularity.CHANNEL else rows * cols if spec.granularity is Granularity.TENSOR else spec.group_size
    g = w.reshape(-1, size) if spec.granularity is Granularity.TENSOR else w.reshape(rows, -1, size)
    b = spec.bits
    if spec.format is WeightFormat.MXINT:
        step = 2.0 ** torch.floor(torch.log2(g.abs().amax(-1, keepdim=True))) / 2 ** (b - 2)
    elif spec.full_range:
        step = g.abs().amax(-1, keepdim=True) / 2 ** (b - 1)
    elif spec.symmetric:
        step = g.abs().amax(-1, keepdim=True) / (2 ** (b - 1) - 1)
    else:
        step = (g.amax(-1, keepdim=True).clamp(min=0) - g.amin(-1, keepdim=True).clamp(max=0)) / (2**b - 1)
    return step.expand_as(g).reshape(rows, cols)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_dequant_is_codes_times_scale(spec):
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    q = quantize_weight(w, spec)
    gs = spec.group_size if spec.granularity is Granularity.GROUP else (32 if spec.granularity is Granularity.CHANNEL else 6 * 32)
    codes = q.codes.float().reshape(q.scale.shape[0], -1, gs)
    zero = 0 if q.zero is None else q.zero.float().unsqueeze(-1)
    rebuilt = ((codes - zero) * q.scale.unsqueeze(-1)).reshape(6, 32)
    assert torch.allclose(rebuilt, q.dequant, atol=1e-7)
    if spec.format is WeightFormat.INT and spec.symmetric:  # a grid point is its own rounding
        # (asymmetric grids need not be: the stored scale is rounded up, so a grid may leave its top code unused and
        # the range of its points then calls for a smaller scale)
        assert torch.equal(quantize_weight(q.dequant, spec).dequant, q.dequant)
    # (MXINT is not idempotent: code -2^(b-1) reaches -2X, which raises the block's exponent when re-quantized)


def test_symmetric_int4_uses_minus7_to_7_and_keeps_the_absmax():
    w = torch.tensor([[-1.0, -0.6, 0.0, 0.25, 1.0, 0.7]])
    q = quantize_weight(w, WeightQuant(bits=4))
    assert q.scale.item() == 146 / 1024  # 1/7 = 146.29/1024 rounded to 8 significant bits (stored_scale)
    assert q.codes.tolist() == [[-7, -4, 0, 2, 7, 5]]
    assert abs(q.dequant[0, 4].item() - 1.0) < 2**-7  # the absmax, within the scale's rounding


def test_full_range_int4_puts_each_rows_peak_on_minus8_with_a_signed_scale():
    w = torch.tensor([[0.8, -0.6, 0.0, 0.21, -0.33, 0.7], [-0.8, 0.75, 0.1, 0.0, 0.0, 0.0]])
    q = quantize_weight(w, WeightQuant(bits=4, full_range=True))
    assert q.scale.flatten().tolist() == [-205 / 2048, 205 / 2048]  # the peak's sign is the scale's, opposite; 0.1 = 204.8/2048 rounded to 8 bits
    assert q.codes.tolist() == [[-8, 6, 0, -2, 3, -7], [-8, 7, 1, 0, 0, 0]]  # 0.75 / 0.1001 = 7.49 rounds to 7
    assert q.dequant[0, 0] == pytest.approx(0.8, rel=2**-7) and q.dequant[1, 0] == pytest.approx(-0.8, rel=2**-7)  # the peaks, within the rounding


def test_full_range_refines_the_step_and_lowers_rtns_error():
    """The property the grid is for: at the same bits, 2^(b-1) steps per side instead of 2^(b-1) - 1."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    for bits in (3, 4):
        full, plain = (quantize_weight(w, WeightQuant(bits=bits, full_range=f)) for f in (True, False))
        torch.testing.assert_close(  # within the two stored scales' rounding up (< 2^-7 each)
            quant_step(w, WeightQuant(bits=bits, full_range=True)),
            quant_step(w, WeightQuant(bits=bits)) * (2 ** (bits - 1) - 1) / 2 ** (bits - 1),
            rtol=2**-6,
            atol=0,
        )
        assert ((w - full.dequant) ** 2).mean() < 0.85 * ((w - plain.dequant) ** 2).mean()


@pytest.mark.parametrize(
    "kwargs", [{"symmetric": False}, {"format": WeightFormat.MXINT, "granularity": Granularity.GROUP, "group_size": 16}], ids=["asym", "mxint"]
)
def test_full_range_is_refused_where_the_grid_fixes_its_own_range(kwargs):
    with pytest.raises(ValueError, match="full_range: true needs format 'int' with symmetric: true"):
        WeightQuant(full_range=True, **kwargs)


def test_asymmetric_represents_zero_exactly_and_uses_the_whole_range():
    w = torch.tensor([[0.0, 0.3, 1.5, 3.0]])
    q = quantize_weight(w, WeightQuant(bits=2, symmetric=False))
    assert q.dequant[0, 0] == 0 and q.codes.min() == 0 and q.codes.max() == 3


def test_mxint_shares_a_power_of_two_per_block():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    spec = WeightQuant(bits=4, format=WeightFormat.MXINT, granularity=Granularity.GROUP, group_size=16)
    q = quantize_weight(w, spec)
    assert q.scale.shape == (4, 4)
    log2 = torch.log2(q.scale)
    assert torch.equal(log2, log2.round())  # powers of two
    amax = w.reshape(4, 4, 16).abs().amax(-1)
    assert torch.equal(q.scale, torch.exp2(torch.floor(torch.log2(amax)) - 2))  # X = 2^floor(log2 max), 2 fraction bits


def test_zero_rows_and_groups_stay_zero():
    w = torch.zeros(3, 16)
    for spec in SPECS[:5]:
        spec = WeightQuant(bits=spec.bits, symmetric=spec.symmetric, granularity=spec.granularity, group_size=8)
        q = quantize_weight(w, spec)
        assert torch.equal(q.dequant, w) and torch.isfinite(q.scale).all()


def test_group_size_must_divide_the_width():
    with pytest.raises(ValueError, match="input width 576 is not divisible by group_size 128"):
        quantize_weight(torch.randn(2, 576), WeightQuant(granularity=Granularity.GROUP, group_size=128))


def test_per_token_activation_quantization():
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    x[0, 0] *= 100
    y = fake_quant_activation(x, ActQuant(bits=8))
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((x - y).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(fake_quant_activation(x, ActQuant(bits=None)), x)
    per_tensor = fake_quant_activation(x, ActQuant(bits=8, granularity=ActGranularity.TENSOR))
    assert (x - per_tensor)[1].abs().mean() > (x - y)[1].abs().mean()  # one outlier token hurts every token per-tensor


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_codes_and_scales_rebuild_the_dequantized_weight_exactly(spec):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) * 0.05
    q = quantize_weight(w, spec)
    assert torch.equal(dequantize(q.codes, q.scale, q.zero, spec), q.dequant)
