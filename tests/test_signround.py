"""SignRound: RTN at zero steps, lower output error than RTN, offsets that only pick floor or ceil, clipping
only where the format leaves scales free, composition in the pipeline, clear refusals."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from helpers import postpass, tiny_model_and_calibration
from qaft.core.errors import ConfigError
from qaft.core.modules import decoder_layers, hidden_states
from qaft.quant import methods
from qaft.quant.calibrate import LayerStats
from qaft.quant.grid import group_view, quantize_weight
from qaft.quant.postpass import block_errors, capture_inputs, quantize_model
from qaft.quant.quantizers.base import QuantizationFailed
from qaft.quant.quantizers.signround import SignRoundOptions, signround
from qaft.quant.scheme import ActQuant, GGUFType, Granularity, QuantScheme, WeightFormat, WeightQuant
from qaft.trainer.kd import kd_loss

SPECS = [
    WeightQuant(),
    WeightQuant(symmetric=False),
    WeightQuant(bits=3, granularity=Granularity.GROUP, group_size=16),
    WeightQuant(symmetric=False, granularity=Granularity.GROUP, group_size=16),
    WeightQuant(granularity=Granularity.TENSOR),
    WeightQuant(full_range=True),
    WeightQuant(bits=3, granularity=Granularity.GROUP, group_size=16, full_range=True),
    WeightQuant(format=WeightFormat.MXINT, granularity=Granularity.GROUP, group_size=16),
    *(WeightQuant(format=WeightFormat.GGUF, gguf_type=t) for t in (GGUFType.Q4_0, GGUFType.Q4_1, GGUFType.Q5_0, GGUFType.Q8_0)),
]
IDS = [s.label for s in SPECS]
FIXED_SCALES = [s for s in SPECS if s.format is not WeightFormat.INT]


def outlier_stats(d: int = 64, n: int = 2048) -> LayerStats:
    """Correlated inputs with a few large channels, as LLM activations have."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g) + 0.3 * torch.randn(n, d, generator=g)
    x[:, :3] *= 8
    st = LayerStats(d)
    st.update(x)
    return st


def weight(out: int = 48, d: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, d, generator=torch.Generator().manual_seed(seed))


def output_error(w: torch.Tensor, deq: torch.Tensor, st: LayerStats) -> float:
    e = (w - deq).double()
    return torch.trace(e @ st.covariance @ e.T).item()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_zero_steps_is_rtn_bit_for_bit(spec):
    w, st = weight(), outlier_stats()
    q, r = signround(w, st, spec, SignRoundOptions(iters=0)), quantize_weight(w, spec)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale) and torch.equal(q.dequant, r.dequant)
    assert (q.zero is None and r.zero is None) or torch.equal(q.zero, r.zero)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_learned_rounding_lowers_the_output_error_below_rtn(spec):
    w, st = weight(), outlier_stats()
    learned = output_error(w, signround(w, st, spec, SignRoundOptions(iters=100)).dequant, st)
    assert learned < 0.9 * output_error(w, quantize_weight(w, spec).dequant, st)


@pytest.mark.parametrize("spec", FIXED_SCALES, ids=[s.label for s in FIXED_SCALES])
def test_on_formats_with_ruled_scales_only_the_rounding_direction_changes(spec):
    """MXINT / GGUF: the scales stay the format's own, and every code is RTN's or its neighbour (|V| ≤ ½)."""
    w, st = weight(), outlier_stats()
    q, r = signround(w, st, spec, SignRoundOptions(iters=100, lr=0.05)), quantize_weight(w, spec)
    assert torch.equal(q.scale, r.scale) and ((q.zero is None) or torch.equal(q.zero, r.zero))
    moved = (q.codes.int() - r.codes.int()).abs()
    assert moved.max() == 1 and moved.float().mean() < 0.5


def test_without_clipping_codes_are_floor_or_ceil_of_the_scaled_weight():
    """The paper's search space: round(w/Δ + V), V ∈ [−½, ½], i.e. ⌊w/Δ⌋ or ⌈w/Δ⌉ (within the grid's range)."""
    w, st, spec = weight(), outlier_stats(), WeightQuant(bits=3, granularity=Granularity.GROUP, group_size=16)
    q = signround(w, st, spec, SignRoundOptions(iters=100, lr=0.05, minmax=False))  # steps that could carry V past ½
    u = (group_view(w, spec) / q.scale.unsqueeze(-1)).reshape(w.shape)
    c = q.codes.float()
    assert torch.all((c == torch.floor(u).clamp(-3, 3)) | (c == torch.ceil(u).clamp(-3, 3)))
    assert not torch.equal(q.codes, quantize_weight(w, spec).codes)


def test_clipping_is_learned_on_int_grids_within_its_bounds():
    w, st, spec = weight(), outlier_stats(), WeightQuant(bits=3)
    rtn = quantize_weight(w, spec)
    q = signround(w, st, spec, SignRoundOptions(iters=100, min_clip=0.7))
    ratio = q.scale / rtn.scale
    # some rows clipped, none widened (the RTN scale rounded up to the stored grid by < 2^-8 at 3 bits: grid.stored_scale)
    assert ratio.min() >= 0.7 * (1 - 2**-8) and ratio.max() <= 1 and ratio.min() < 1


def test_grids_it_cannot_express_are_refused_naming_those_that_work():
    w, st = weight(), outlier_stats()
    with pytest.raises(QuantizationFailed, match=r"MXFP4.*int grids, MXINT and GGUF Q4_0, Q4_1, Q5_0, Q5_1, Q8_0"):
        signround(w, st, WeightQuant(format=WeightFormat.GGUF, gguf_type=GGUFType.MXFP4))
    with pytest.raises(QuantizationFailed, match=r"minmax.*set minmax: false"):
        signround(w, st, WeightQuant(format=WeightFormat.GGUF, gguf_type=GGUFType.Q4_0), SignRoundOptions(minmax=True))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_calibration()


def test_in_the_pipeline_it_beats_rtn_on_every_layer_and_composes_with_each_reconstructor(tiny):
    model, calib = tiny
    scheme = QuantScheme(weight=WeightQuant(bits=3))
    kw = dict(propagate="float", progress=False)  # the same inputs for both: a per-layer comparison
    sr = {"name": "signround", "iters": 50, "objective": "linear"}  # per Linear: each Linear's own error is what it lowers
    rtn, _ = quantize_model(copy.deepcopy(model), calib, scheme, postpass(None, 0), **kw)
    learned, _ = quantize_model(copy.deepcopy(model), calib, scheme, postpass(None, 0, quantizer=sr), **kw)
    worse = [a.name for a, b in zip(learned, rtn) if not a.rel_output_error < b.rel_output_error]
    assert not worse, worse
    for recon in ("lqer", "l2qer", "whiten", "aser"):
        both, _ = quantize_model(copy.deepcopy(model), calib, scheme, postpass(recon, 8, quantizer=sr), **kw)
        assert all(c.rel_output_error < c.rel_output_error_rtn for c in both), recon
    assert {"signround", "signround+whiten", "signround+aser"} <= set(methods.names())


def test_a_grid_it_cannot_express_fails_the_post_pass_in_one_line(tiny):
    model, calib = tiny
    scheme = QuantScheme(weight=WeightQuant(format=WeightFormat.GGUF, gguf_type=GGUFType.MXFP4))
    with pytest.raises(ConfigError, match=r"^postpass\.quantizer: signround on model\.layers\.0\.self_attn\.q_proj: .*MXFP4"):
        quantize_model(copy.deepcopy(model), calib, scheme, postpass(None, 0, quantizer="signround"), progress=False)


BLOCK = {"name": "signround", "iters": 40, "objective": "block", "batch": 2, "bf16": False}


@pytest.mark.parametrize("spec", [WeightQuant(bits=3), WeightQuant(format=WeightFormat.GGUF, gguf_type=GGUFType.Q4_0)], ids=["W3", "Q4_0"])
def test_block_objective_lowers_every_layers_output_error_against_the_float_layer(tiny, spec):
    """AutoRound's objective: each decoder layer's output (all its Linears on the grid) against the float layer's
    output on the float stream; the refinement must lower it on every layer, and below what the per-Linear objective reaches."""
    model, calib = tiny
    scheme = QuantScheme(weight=spec)
    reports, _ = quantize_model(copy.deepcopy(model), calib, scheme, postpass(None, 0, quantizer=BLOCK), progress=False)
    per_layer = {r.name.rsplit(".", 2)[0]: r.block_error for r in reports}
    assert all(after < 0.7 * before for before, after in per_layer.values()), per_layer
    linear = copy.deepcopy(model)
    quantize_model(linear, calib, scheme, postpass(None, 0, quantizer={**BLOCK, "objective": "linear"}), progress=False)
    blockwise = copy.deepcopy(model)
    quantize_model(blockwise, calib, scheme, postpass(None, 0, quantizer=BLOCK), progress=False)
    assert sum(block_errors(blockwise, model, calib)) < sum(block_errors(linear, model, calib))


@pytest.mark.parametrize("recon", [None, "whiten"])
def test_block_objective_at_zero_steps_is_rtn_and_leaves_the_layer_as_it_found_it(tiny, recon):
    """With a reconstructor, zero steps is the closed form (RTN + its correction): the correction held during the
    refinement is the one solved on the round-to-nearest residual."""
    model, calib = tiny
    scheme = QuantScheme(weight=WeightQuant(bits=3))
    rtn, sr = copy.deepcopy(model), copy.deepcopy(model)
    sr.requires_grad_(True)
    quantize_model(rtn, calib, scheme, postpass(recon, 4), progress=False)
    quantize_model(sr, calib, scheme, postpass(recon, 4, quantizer={**BLOCK, "iters": 0}), progress=False)
    a, b = rtn.state_dict(), sr.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    others = [p for n, p in sr.named_parameters() if "norm" in n]  # the refinement freezes the layer while it works
    assert others and all(p.requires_grad for p in others)


def calibration_kl(model: torch.nn.Module, reference: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return kd_loss(model(ids).logits, reference(ids).logits, 1.0).item()


def test_block_objective_composes_with_each_reconstructor_and_activation_quantization(tiny):
    """ASER smooths (input scales) and extracts columns; W4A8 rounds activations: the refinement sees the layer as
    deployed, its correction included, and improves on the closed form (RTN + the same reconstructor) it starts from."""
    model, calib = tiny
    for recon, scheme in [
        ("aser", QuantScheme(weight=WeightQuant(bits=3))),
        ("whiten", QuantScheme(weight=WeightQuant(bits=3), activation=ActQuant(bits=8))),
    ]:
        refined, closed = copy.deepcopy(model), copy.deepcopy(model)
        reports, _ = quantize_model(refined, calib, scheme, postpass(recon, 4, quantizer=BLOCK), progress=False)
        assert all(r.block_error[1] < 0.7 * r.block_error[0] for r in reports), recon
        quantize_model(closed, calib, scheme, postpass(recon, 4), progress=False)
        assert calibration_kl(refined, model, calib) < 0.5 * calibration_kl(closed, model, calib), recon


@pytest.mark.parametrize("recon", [None, "aser"])
def test_the_block_error_it_reports_is_the_deployed_layers(tiny, recon):
    """The refinement simulates the layer as ``QuantLinear`` will run it (here with A8 activation rounding; ASER's
    smoothing, extracted columns and its correction): the errors it reports before and after refining equal the
    deployed model's, measured independently (quantized stream vs float stream) on the sequences it reports on, the
    first batch."""
    # In float64: A8 rounds every activation, so a float32 difference of one unit in the last place between the two
    # computations (kernels differ between AVX-512 and AVX2 hosts) flips codes and moves the error by ~1e-4 relative
    model, calib = copy.deepcopy(tiny[0]).double(), tiny[1]
    scheme = QuantScheme(weight=WeightQuant(bits=3), activation=ActQuant(bits=8))
    deployed = copy.deepcopy(model)
    reports, _ = quantize_model(deployed, calib, scheme, postpass(recon, 4, quantizer=BLOCK, bf16=False), progress=False)  # float32 streams, as measured below
    reported = list({r.name.rsplit(".", 2)[0]: r.block_error for r in reports}.values())
    rtn = copy.deepcopy(model)  # without a correction, the refinement's start: each layer round-to-nearest, on the refined stream below it
    quantize_model(rtn, calib, scheme, postpass(None, 0), progress=False)
    (_, quantized), (_, floats), (_, nearest) = decoder_layers(deployed), decoder_layers(model), decoder_layers(rtn)
    first = calib[: BLOCK["batch"]]
    xq, xf = capture_inputs(deployed, quantized[0], first), capture_inputs(model, floats[0], first)

    def error(ys: list[torch.Tensor], yf: list[torch.Tensor]) -> float:
        return (sum((a - b).pow(2).sum() for a, b in zip(ys, yf)) / sum(b.pow(2).sum() for b in yf)).item()

    measured = []
    with torch.no_grad():
        for q, r, f in zip(quantized, nearest, floats):
            yq, yr, yf = ([hidden_states(m(h, **kw)) for h, kw in x] for m, x in ((q, xq), (r, xq), (f, xf)))
            measured.append((error(yr, yf), error(yq, yf)))
            xq, xf = [(y, kw) for y, (_, kw) in zip(yq, xq)], [(y, kw) for y, (_, kw) in zip(yf, xf)]
    if recon is not None:  # the start holds the correction solved on the round-to-nearest residual: not rebuilt here
        reported, measured = [r[1] for r in reported], [m[1] for m in measured]
    assert reported == [pytest.approx(m, rel=1e-9) for m in measured]


def test_telemetry_and_report_show_round_to_nearest_beside_the_learned_rounding(tiny, tmp_path, monkeypatch):
    from qaft.pipeline import report

    model, calib = tiny
    scheme = QuantScheme(weight=WeightQuant(bits=3))
    rtn, _ = quantize_model(copy.deepcopy(model), calib, scheme, postpass(None, 0), progress=False)
    assert all(r.rel_output_error_nearest == pytest.approx(r.rel_output_error_rtn, rel=1e-6) for r in rtn)
    learned, _ = quantize_model(copy.deepcopy(model), calib, scheme, postpass(None, 0, quantizer=BLOCK), progress=False)
    assert sum(r.rel_output_error_rtn for r in learned) < sum(r.rel_output_error_nearest for r in learned)

    drawn = []
    monkeypatch.setattr(report, "_save_error_plot", lambda fig, f, ax, *a: drawn.append([line.get_label() for line in ax.get_lines()]))
    for reports, method in ((rtn, "rtn+none"), (learned, "signround+none")):
        report.layer_error_figure(report.Figures(tmp_path), {"layers": [dataclasses.asdict(r) for r in reports], "method": method, "rank": 0})
    assert drawn == [["quantized only (rtn)"], ["round to nearest", "quantized only (signround)"]]
