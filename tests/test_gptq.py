"""GPTQ: RTN when H = I, lower output error on correlated inputs, RTN's grid layout, composition, clear failures."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import postpass, tiny_model_and_calibration
from qaft.core.errors import ConfigError
from qaft.quant import methods
from qaft.quant.calibrate import LayerStats
from qaft.quant.ggufgrid import CODE_RANGE
from qaft.quant.grid import dequantize, quantize_weight
from qaft.quant.postpass import quantize_model
from qaft.quant.quantizers.gptq import GPTQOptions, SingularHessian, gptq
from qaft.quant.scheme import GGUFType, Granularity, QuantScheme, WeightFormat, WeightQuant

SPECS = [
    WeightQuant(),
    WeightQuant(bits=3, granularity=Granularity.GROUP, group_size=16),
    WeightQuant(full_range=True),
    WeightQuant(symmetric=False, granularity=Granularity.GROUP, group_size=16),
    WeightQuant(format=WeightFormat.MXINT, granularity=Granularity.GROUP, group_size=16),
    *(WeightQuant(format=WeightFormat.GGUF, gguf_type=t) for t in (GGUFType.Q4_0, GGUFType.Q4_1, GGUFType.MXFP4)),
    WeightQuant(granularity=Granularity.TENSOR),
]
IDS = [s.label for s in SPECS]


def stats_of(x: torch.Tensor) -> LayerStats:
    st = LayerStats(x.shape[-1])
    st.update(x)
    return st


def correlated(n: int = 4000, d: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_identity_hessian_without_damping_is_rtn_exactly(spec):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    a, b = gptq(w, stats_of(torch.eye(64) * 3), spec, GPTQOptions(damp=0.0)), quantize_weight(w, spec)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.dequant, b.dequant)
    assert (a.zero is None) == (b.zero is None) and (a.zero is None or torch.equal(a.zero, b.zero))


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_gptq_lowers_the_output_error_on_correlated_inputs(spec, act_order):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    st = stats_of(correlated())
    c = st.covariance.float()
    err = lambda q: ((w - q) @ c * (w - q)).sum().item()  # noqa: E731  tr((W-Q) C (W-Q)^T)
    q = gptq(w, st, spec, GPTQOptions(act_order=act_order))
    assert err(q.dequant) < 0.8 * err(quantize_weight(w, spec).dequant)


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_codes_and_scales_have_rtns_layout_and_respect_group_boundaries(spec, act_order):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    q, r = gptq(w, stats_of(correlated()), spec, GPTQOptions(act_order=act_order, block_size=24)), quantize_weight(w, spec)
    assert q.codes.shape == r.codes.shape and q.scale.shape == r.scale.shape and (q.zero is None) == (r.zero is None)
    assert torch.equal(dequantize(q.codes, q.scale, q.zero, spec), q.dequant)  # each code uses its own group's scale
    lo, hi = {WeightFormat.MXINT: (-8, 7)}.get(spec.format, ((-8 if spec.full_range else -7), 7) if spec.symmetric else (0, 15))
    if spec.gguf_type is not None:
        lo, hi = CODE_RANGE[spec.gguf_type]
    if spec.bits == 3:
        lo, hi = -3, 3
    assert q.codes.min() >= lo and q.codes.max() <= hi


def test_a_hessian_singular_after_damping_is_refused():
    x = torch.randn(3, 64)  # rank 3 < 64
    with pytest.raises(SingularHessian, match="not positive definite"):
        gptq(torch.randn(8, 64), stats_of(x), WeightQuant(), GPTQOptions(damp=0.0))
    gptq(torch.randn(8, 64), stats_of(x), WeightQuant(), GPTQOptions(damp=0.01))  # damping fixes it
    with pytest.raises(SingularHessian, match="no calibration tokens"):
        gptq(torch.randn(8, 64), LayerStats(64), WeightQuant())


def test_dead_input_channels_get_zero_weight_columns():
    x = correlated()
    x[:, 5] = 0
    q = gptq(torch.randn(8, 64), stats_of(x), WeightQuant())
    assert (q.codes[:, 5] == 0).all()


@pytest.fixture
def tiny():
    return tiny_model_and_calibration()


def test_in_the_pipeline_gptq_beats_rtn_on_every_layer_and_composes_with_reconstruction(tiny):
    model, calib = tiny
    scheme = QuantScheme(weight=WeightQuant(bits=3))
    kw = dict(propagate="float", progress=False)  # same inputs for every method: a per-layer comparison
    rtn_reports, _ = quantize_model(copy.deepcopy(model), calib, scheme, postpass(None, 0), **kw)
    gptq_reports, _ = quantize_model(copy.deepcopy(model), calib, scheme, postpass(None, 0, quantizer="gptq"), **kw)
    both, _ = quantize_model(copy.deepcopy(model), calib, scheme, postpass("l2qer", 8, quantizer="gptq"), **kw)
    worse = [a.name for a, b in zip(gptq_reports, rtn_reports) if not a.rel_output_error < b.rel_output_error]
    assert not worse, worse
    assert all(c.rel_output_error < a.rel_output_error for c, a in zip(both, gptq_reports))


def test_gptq_in_the_pipeline_names_the_layer_and_the_fix(tiny):
    model, _ = tiny
    few = torch.randint(0, 257, (1, 4))  # 4 tokens: every Hessian has rank <= 4 < 64
    with pytest.raises(ConfigError, match=r"^postpass\.quantizer: gptq on model\.layers\.0\.self_attn\.q_proj: .* raise postpass\.quantizer\.damp"):
        quantize_model(model, few, QuantScheme(), postpass(None, 0, quantizer={"name": "gptq", "damp": 0.0}), progress=False)


def test_method_names_compose_quantizer_and_reconstruction():
    names = methods.names()
    assert names[:3] == ["fp", "rtn", "gptq"] and {"lqer", "l2qer", "whiten", "aser", "gptq+lqer", "gptq+l2qer", "gptq+whiten", "gptq+aser"} <= set(names)
    default = postpass("l2qer", 8)
    assert methods.resolve("fp", default) is None
    m = methods.resolve("gptq+aser", default)
    assert (m.quantizer.name, m.reconstructor.name, m.name, m.label) == ("gptq", "aser", "gptq+aser", "gptq+aser")
    assert m.quantizer.options.damp == 0.01 and m.reconstructor.options.outliers == 4  # registered defaults
    assert methods.resolve("l2qer", default).label == "rtn+l2qer" and methods.resolve("gptq", default).label == "gptq+none"
    # the config's options are used where it names the same entries
    tuned = postpass({"name": "aser", "outliers": 2}, 8, quantizer={"name": "gptq", "act_order": True})
    m = methods.resolve("gptq+aser", tuned)
    assert m.quantizer.options.act_order and m.reconstructor.options.outliers == 2
    assert methods.parse_list("fp, rtn+aser,gptq") == ["fp", "aser", "gptq"]
    with pytest.raises(ConfigError, match=r"--methods: unknown method 'gptq\+asr' \(did you mean 'gptq\+aser'\?\)"):
        methods.parse_list("gptq+asr")
