"""The layer-sequential driver on tiny models: statistics, reconstruction, errors before work, evaluation."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import postpass
from qaft.core.errors import ConfigError
from qaft.core.model import ModelConfig, load_model_and_tokenizer
from qaft.core.modules import decoder_layers
from qaft.core.text import windows_of
from qaft.eval.perplexity import perplexity
from qaft.quant.calibrate import collect
from qaft.quant.fakequant import QuantLinear
from qaft.quant.grid import quantize_weight
from qaft.quant.postpass import quantize_model
from qaft.quant.scheme import ActQuant, Granularity, QuantScheme, WeightQuant


@pytest.fixture(params=["tiny-llama", "tiny-opt"])
def tiny(request):
    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=request.param))
    calib = torch.randint(0, 257, (6, 32), generator=torch.Generator().manual_seed(1))
    return model, calib


def test_layer_sequential_and_whole_model_calibration_give_the_same_statistics(tiny):
    model, calib = tiny
    scheme = QuantScheme()
    targets = {}
    for name, mod in model.named_modules():
        if name.endswith("layers"):
            for i, layer in enumerate(mod):
                targets |= {f"{name}.{i}.{n}": m for n, m in scheme.layer_linears(layer, f"{name}.{i}").items()}
    with collect(targets) as whole:
        for seq in calib:
            model(input_ids=seq[None], use_cache=False)
    _, sequential = quantize_model(copy.deepcopy(model), calib, scheme, postpass(None, 0, bf16=False), propagate="float", keep_statistics=True, progress=False)
    assert sequential.keys() == whole.keys() and len(whole) >= 12
    for k in whole:
        assert sequential[k].n_tokens == whole[k].n_tokens == 6 * 32
        assert torch.allclose(sequential[k].xtx, whole[k].xtx, rtol=1e-5, atol=1e-6), k
        assert torch.allclose(sequential[k].abs_mean_max, whole[k].abs_mean_max, rtol=1e-5, atol=1e-7), k


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_linears_fed_one_tensor_share_one_set_of_statistics_and_it_is_exact(tiny, bf16):
    """q/k/v (and gate/up) read one tensor: one ``LayerStats`` for them, read from tensor identity; its ``XᵀX``
    (float32 products per batch, float64 sums) equals the float64 sum over the inputs each Linear really saw, to 1e-6 —
    also when the forwards run under bf16 autocast (``postpass.bf16``), which must not reach the statistics' own products
    (a bf16 ``XᵀX`` is off by ~1e-3 and not even positive semi-definite: GPTQ's Cholesky then fails)."""
    model, calib = tiny
    scheme = QuantScheme()
    prefix, layers = decoder_layers(model)
    targets = scheme.layer_linears(layers[0], f"{prefix}.0")
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen[n].append(args[0])) for n, m in targets.items()]
    with torch.no_grad(), collect(targets) as stats, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for seq in calib:
            model(input_ids=seq[None], use_cache=False)
    for h in handles:
        h.remove()
    assert (torch.bfloat16 in {t.dtype for xs in seen.values() for t in xs}) == bf16  # autocast reached the Linears
    same_input = {n: frozenset(k for k in targets if all(a is b for a, b in zip(seen[k], seen[n]))) for n in targets}
    same_stats = {n: frozenset(k for k in targets if stats[k] is stats[n]) for n in targets}
    assert same_stats == same_input and max(map(len, same_input.values())) >= 2
    for n, xs in seen.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
        ref = x.T @ x
        assert ((stats[n].xtx - ref).norm() / ref.norm()).item() < 1e-6  # float32 products: ~1e-7 of the matrix, not of each entry
        assert stats[n].n_tokens == x.shape[0]
        torch.testing.assert_close(stats[n].abs_max, x.abs().amax(0), rtol=0, atol=0)


def test_bf16_calibration_forwards_move_the_result_only_within_bf16_precision(tiny):
    """``postpass.bf16``: the layer passes run bf16 matmuls; every layer's output error stays within a few percent
    of the float32 calibration's, and the run really differs (the switch is live)."""
    model, calib = tiny
    runs = {b: quantize_model(copy.deepcopy(model), calib, QuantScheme(), postpass("whiten", 4, bf16=b), progress=False)[0] for b in (False, True)}
    fp32, bf16 = ([r.rel_output_error for r in runs[b]] for b in (False, True))
    assert fp32 != bf16
    assert bf16 == pytest.approx(fp32, rel=0.05)


def test_every_target_becomes_a_quant_linear_and_embeddings_and_head_stay_float(tiny):
    model, calib = tiny
    head, emb = model.get_output_embeddings().weight.clone(), model.get_input_embeddings().weight.clone()
    reports, _ = quantize_model(model, calib, QuantScheme(), postpass("lqer", 4), progress=False)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == len(reports) and all(r.rank == 4 for r in reports)
    for m in (m for m in model.modules() if isinstance(m, QuantLinear)):  # PEFT orientation, so export maps names 1:1
        assert m.lora_A.shape == (4, m.in_features) and m.lora_B.shape == (m.out_features, 4)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear) and not isinstance(model.get_output_embeddings(), QuantLinear)
    assert torch.equal(model.get_output_embeddings().weight, head) and torch.equal(model.get_input_embeddings().weight, emb)


@pytest.mark.parametrize("method", ["lqer", "l2qer", "whiten"])
def test_reconstruction_lowers_the_output_error_of_every_layer(tiny, method):
    model, calib = tiny
    reports, _ = quantize_model(model, calib, QuantScheme(weight=WeightQuant(bits=3)), postpass(method, 8), progress=False)
    assert all(r.rel_output_error < r.rel_output_error_rtn for r in reports), [(r.name, r.rel_output_error, r.rel_output_error_rtn) for r in reports]


def test_reconstruction_brings_logits_closer_to_float(tiny):
    model, calib = tiny
    ids = torch.randint(0, 257, (1, 48), generator=torch.Generator().manual_seed(9))
    ref = model(ids).logits
    scheme = QuantScheme(weight=WeightQuant(bits=3))
    dist = {}
    for method in (None, "whiten"):
        m = copy.deepcopy(model)
        quantize_model(m, calib, scheme, postpass(method, 16), progress=False)
        dist[method] = (m(ids).logits - ref).norm().item()
    assert dist["whiten"] < dist[None]


def test_full_rank_correction_restores_the_float_model_without_activation_quant(tiny):
    model, calib = tiny
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(3))
    ref = model(ids).logits
    m = copy.deepcopy(model)
    square = QuantScheme(weight=WeightQuant(bits=2), targets=(r"(q_proj|o_proj|out_proj)$",))  # 64 x 64: rank 64 is full
    reports, _ = quantize_model(m, calib, square, postpass("lqer", 64), progress=False)
    assert len(reports) == 4
    assert torch.allclose(m(ids).logits, ref, atol=1e-4)
    a8 = copy.deepcopy(model)
    quantize_model(a8, calib, QuantScheme(weight=WeightQuant(bits=8), activation=ActQuant(bits=8)), postpass(None, 0), progress=False)
    out = a8(ids).logits
    assert not torch.equal(out, ref) and (out - ref).norm() / ref.norm() < 0.05  # W8A8: close, not exact


def test_bad_schemes_fail_before_any_work_naming_the_layer(tiny):
    model, calib = tiny
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"quant\.weight\.group_size: 48 does not divide the input width 64 of model\.(decoder\.)?layers\.0\."):
        quantize_model(model, calib, QuantScheme(weight=WeightQuant(granularity=Granularity.GROUP, group_size=48)), postpass(None, 0), progress=False)
    with pytest.raises(ConfigError, match=r"postpass\.rank: 100 exceeds min\(out, in\) = \d+ of model\."):
        quantize_model(model, calib, QuantScheme(), postpass("lqer", 100), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing was touched


def test_perplexity_follows_the_window_protocol(tiny):
    model, _ = tiny
    ids = torch.randint(0, 257, (1000,), generator=torch.Generator().manual_seed(4))
    r = perplexity(model, ids, seq_len=64, windows=3, progress=False)
    assert r.windows == 3 and r.tokens == 3 * 63
    w = windows_of(ids, 64, 3)
    logits = torch.cat([model(x[None]).logits[0, :-1] for x in w])
    expect = torch.nn.functional.cross_entropy(logits, torch.cat([x[1:] for x in w])).exp().item()
    assert r.ppl == pytest.approx(expect, rel=1e-5)
    assert perplexity(model, ids, seq_len=64, windows=None, progress=False).windows == 1000 // 64


def test_smoothing_groups_by_shared_input_and_folds_into_the_producing_norm(tiny):
    from qaft.core.modules import decoder_layers
    from qaft.quant.calibrate import input_sources
    from qaft.quant.postpass import capture_inputs

    model, calib = tiny
    prefix, layers = decoder_layers(model)
    layer = layers[0]
    targets = QuantScheme().layer_linears(layer, f"{prefix}.0")
    captured = capture_inputs(model, layer, calib[:1])
    with input_sources(layer, targets) as src:
        layer(captured[0][0], **captured[0][1])
    groups = {}
    for n, (key, norm) in src.items():
        groups.setdefault((key, norm), set()).add(n.rsplit(".", 1)[-1])
    by_members = {frozenset(m): norm for (_, norm), m in groups.items()}
    if "mlp.gate_proj" in targets:  # llama
        assert by_members == {
            frozenset({"q_proj", "k_proj", "v_proj"}): "input_layernorm",
            frozenset({"o_proj"}): None,
            frozenset({"gate_proj", "up_proj"}): "post_attention_layernorm",
            frozenset({"down_proj"}): None,
        }
    else:  # opt
        assert by_members == {
            frozenset({"q_proj", "k_proj", "v_proj"}): "self_attn_layer_norm",
            frozenset({"out_proj"}): None,
            frozenset({"fc1"}): "final_layer_norm",
            frozenset({"fc2"}): None,
        }


def test_smoothing_alone_is_an_exact_reparametrisation(tiny):
    """Smoothing without any quantization, in float64: weight columns times f, 1/f folded into the norms or
    applied as explicit input scales, changes the logits only by rounding (~1e-12), while the weights move."""
    from qaft.core.modules import decoder_layers
    from qaft.quant.postpass import capture_inputs
    from qaft.quant.reconstructors import RECONSTRUCTORS

    model, calib = tiny
    model = model.double()
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
        before = copy.deepcopy(model.state_dict())
        aser = RECONSTRUCTORS.create(RECONSTRUCTORS.spec("aser", alpha=0.5, outliers=None, extract=False))
        prefix, layers = decoder_layers(model)
        inputs = capture_inputs(model, layers[0], calib)
        for i, layer in enumerate(layers):
            targets = QuantScheme().layer_linears(layer, f"{prefix}.{i}")
            with collect(targets) as stats, aser.observe(layer, targets) as observed:
                outputs = [layer(h, **kw) for h, kw in inputs]
            prep = aser.prepare(layer, targets, stats, observed)
            for name, scale in prep.input_scales.items():  # what QuantLinear does with an input scale
                targets[name].register_forward_pre_hook(lambda mod, args, s=scale: (args[0] * s,))
            inputs = [(o, kw) for o, (_, kw) in zip(outputs, inputs)]
        after = model(ids).logits
    moved = max(((model.state_dict()[k] - v).abs().max() / v.abs().max()).item() for k, v in before.items() if v.is_floating_point())
    assert moved > 0.1  # the weights really were re-scaled
    assert (after - ref).abs().max() <= 1e-10 * ref.abs().max(), (after - ref).abs().max()


@pytest.mark.parametrize("bits, factor", [(8, 3.0), (4, 1.1)], ids=["W8A8", "W4A8"])
def test_smoothing_cuts_the_a8_logit_error_on_outlier_activations(tiny, bits, factor):
    """What docs/methods/postpass.md states: ASER cuts the W8A8 logit error at least 3x versus whitening alone
    (measured 4.4-6.4x on the two tiny models), and at W4A8, where weight rounding dominates, by at least 1.1x."""
    model, calib = tiny
    with torch.no_grad():  # plant LLM-like outlier channels: a norm weight with a few huge entries
        for m in model.modules():
            if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                m.weight[[3, 17, 40]] *= 30
    ids = torch.randint(0, 257, (1, 64), generator=torch.Generator().manual_seed(5))
    ref = model(ids).logits
    scheme = QuantScheme(weight=WeightQuant(bits=bits), activation=ActQuant(bits=8))
    errs = {}
    for name, recon in (("whiten", "whiten"), ("aser", {"name": "aser", "alpha": 0.5, "outliers": 3, "extract": True})):
        m = copy.deepcopy(model)
        quantize_model(m, calib, scheme, postpass(recon, 8), progress=False)
        errs[name] = ((m(ids).logits - ref).norm() / ref.norm()).item()
    assert errs["whiten"] >= factor * errs["aser"], errs


def test_kept_energy_is_recorded_and_grows_with_rank(tiny):
    model, calib = tiny
    energy = {}
    for k in (4, 16):
        reports, _ = quantize_model(copy.deepcopy(model), calib, QuantScheme(), postpass("l2qer", k), progress=False)
        energy[k] = [r.kept_energy for r in reports]
    assert all(0 < a < b <= 1 for a, b in zip(energy[4], energy[16]))
    rtn, _ = quantize_model(copy.deepcopy(model), calib, QuantScheme(), postpass(None, 0), progress=False)
    assert all(r.kept_energy == 0 and r.rank == 0 for r in rtn)


def test_energy_ranks_vary_per_layer_within_the_cap(tiny):
    model, calib = tiny
    reports, _ = quantize_model(model, calib, QuantScheme(weight=WeightQuant(bits=3)), postpass("whiten", 16, energy=0.6), progress=False)
    ranks = [r.rank for r in reports]
    assert all(1 <= k <= 16 for k in ranks) and len(set(ranks)) > 1 and sum(ranks) <= 16 * len(ranks)
    assert all(r.kept_energy >= 0.6 - 1e-6 or r.rank == 16 for r in reports)


def test_int8_factors_cost_little_output_error_and_are_what_the_layer_holds(tiny):
    model, calib = tiny
    scheme = QuantScheme(weight=WeightQuant(bits=3))
    ref, _ = quantize_model(copy.deepcopy(model), calib, scheme, postpass("whiten", 8), progress=False)
    reports, _ = quantize_model(model, calib, scheme, postpass("whiten", 8, factor_bits=8), progress=False)
    for r, f in zip(reports, ref):  # later layers see slightly different inputs, so int8 may even come out ahead
        assert abs(r.rel_output_error - f.rel_output_error) < 0.05 * f.rel_output_error + 1e-4 and r.rel_output_error < r.rel_output_error_rtn
    lin = next(m for m in model.modules() if isinstance(m, QuantLinear))
    on_grid = quantize_weight(lin.lora_A, WeightQuant(bits=8, granularity=Granularity.CHANNEL)).dequant  # a grid point is its own rounding
    assert torch.equal(on_grid, lin.lora_A)


def _layer_calls(model) -> list[int]:
    """A counter per decoder layer of its forward calls (hooks stay on the copies ``copy.deepcopy`` makes)."""
    calls = [0] * len(decoder_layers(model)[1])
    for i, layer in enumerate(decoder_layers(model)[1]):
        layer.register_forward_pre_hook(lambda mod, args, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def _outputs(model, calib) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=calib, use_cache=False).logits


@pytest.mark.parametrize("name", ["rtn", "lqer"])
def test_a_method_that_reads_no_statistics_runs_no_forward_without_telemetry_and_gives_the_same_model(tiny, name):
    """RTN (and LQER on it) ignore the calibration data: without telemetry not one layer forward runs, and the
    quantized model is bit-identical to the calibrated run's; with telemetry the output errors are measured."""
    from qaft.quant.methods import resolve

    model, calib = tiny
    cfg = postpass("lqer", 4, bf16=False)
    method = resolve(name, cfg)
    calls = _layer_calls(model)
    blind, with_stats = copy.deepcopy(model), copy.deepcopy(model)
    blind_reports, _ = quantize_model(blind, calib, QuantScheme(), cfg, method=method, telemetry=False, progress=False)
    assert sum(calls) == 0
    reports, _ = quantize_model(with_stats, calib, QuantScheme(), cfg, method=method, progress=False)
    assert sum(calls) > 0
    assert all(r.rel_output_error is None and r.rel_output_error_rtn is None for r in blind_reports)
    assert all(r.rel_output_error is not None for r in reports)
    assert [r.error_norm for r in blind_reports] == [r.error_norm for r in reports]
    assert torch.equal(_outputs(blind, calib), _outputs(with_stats, calib))


def test_float_propagation_calibrates_once_for_every_method_and_gives_what_each_alone_gives(tiny):
    """``quantize_models`` under float propagation: one calibration forward per layer and sequence serves all
    methods (ASER's smoothing edits its own copy of the statistics, not the others'), and each model is
    bit-identical to that method's own float-propagation run."""
    from qaft.quant.methods import resolve
    from qaft.quant.postpass import quantize_models

    model, calib = tiny
    cfg = postpass("whiten", 4, bf16=False, propagate="float")
    names = ["whiten", "l2qer", "gptq+whiten", "lqer", "aser"]  # ASER, which edits statistics, first in line
    methods = [resolve(n, cfg) for n in names]
    calls = _layer_calls(model)
    copies = [copy.deepcopy(model) for _ in names]
    together, _ = quantize_models(copies, methods, calib, QuantScheme(), cfg, progress=False)
    n = calib.shape[0]
    assert calls == [2 * n] + [n] * (len(calls) - 1)  # one pass for all five (layer 0 also sees the capture of its inputs)
    for name, method, got, reports in zip(names, methods, copies, together):
        alone = copy.deepcopy(model)
        own, _ = quantize_model(alone, calib, QuantScheme(), cfg, method=method, progress=False)
        assert [r.rel_output_error for r in reports] == [r.rel_output_error for r in own], name
        assert torch.equal(_outputs(got, calib), _outputs(alone, calib)), name
